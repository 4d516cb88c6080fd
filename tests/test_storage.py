"""Publishing: an overwrite on an object store (moto's S3 server over HTTP) never leaves neither output
nor a mix, even when it dies half-way; readers take the files the manifest lists."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage


def _publish(final: str, rows: list[int], overwrite: bool = False, parts: int = 3) -> None:
    """A published table of `rows` in `parts` files, like every writer of the product makes one."""
    with storage.staging(final) as stage:
        fs, _ = storage.get_fs(stage)
        for p in range(parts):
            _, path = storage.get_fs(storage.join(stage, storage.part_name(stage, f"part-{p:05d}.parquet")))
            with fs.open(path, "wb") as f:
                pq.write_table(pa.table({"x": rows[p::parts]}), f)
        storage.publish(stage, final, {"version": rows[0]}, overwrite=overwrite)


def _read(final: str) -> list[int]:
    fs, _ = storage.get_fs(final)
    files = storage.parquet_files(final)
    return sorted(x for path in files for x in pq.read_table(path, filesystem=fs).column("x").to_pylist())


@pytest.fixture()
def bucket(s3_env):
    fs, _ = storage.get_fs("s3://publish-test")
    if not fs.exists("publish-test"):
        fs.mkdir("publish-test")
    return "s3://publish-test"


def test_an_overwrite_killed_half_way_leaves_the_old_output_whole(bucket, monkeypatch):
    final = f"{bucket}/table"
    old, new = list(range(100, 130)), list(range(200, 260))
    _publish(final, old)
    assert _read(final) == old

    fs, _ = storage.get_fs(final)
    copy, copied = fs.copy, []

    def dies_on_the_second_object(src, dst, **kw):
        if copied:
            raise ConnectionError("injected: the network went away mid-publish")
        copied.append(dst)
        return copy(src, dst, **kw)

    monkeypatch.setattr(fs, "copy", dies_on_the_second_object)
    with pytest.raises(ConnectionError):
        _publish(final, new, overwrite=True)
    monkeypatch.undo()
    assert copied and fs.exists(copied[0])  # one new object did land beside the old ones...
    assert storage.read_manifest(final)["version"] == 100 and _read(final) == old  # ...and readers never see it

    _publish(final, new, overwrite=True)
    assert storage.read_manifest(final)["version"] == 200 and _read(final) == new
    _, path = storage.get_fs(final)
    left = sorted(p.rsplit("/", 1)[1] for p in fs.find(path))
    assert left == sorted([*storage.read_manifest(final)["objects"], storage.MANIFEST])  # old and orphans gone


def test_a_local_overwrite_replaces_the_directory_and_lists_its_objects(tmp_path):
    final = str(tmp_path / "table")
    _publish(final, list(range(10)))
    _publish(final, list(range(50, 56)), overwrite=True)
    assert _read(final) == list(range(50, 56))
    assert len(storage.read_manifest(final)["objects"]) == 3 == len(storage.parquet_files(final))
