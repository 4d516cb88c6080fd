"""The embedding job end to end on a generated catalog: local Ray (2 CPUs), real Parquet, a moto S3 server."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from item_model import load_model_dir
from pipeline import storage
from pipeline.catalog import CatalogSchemaError, ColumnMap
from pipeline.embed import REJECTS_DIR, EmbedOptions, run_embed
from pipeline.encode import Encoder, resolve_precision
from pipeline.rows import Preprocess
from pipeline.sample_catalog import EXPECTED_OUTCOME, make_sample_catalog, write_sample_catalog

CATALOG_ROWS = 150
# several part files and several batches; fp32, so the job's vectors equal the model's own encode exactly
OPTIONS = EmbedOptions(batch_size=32, rows_per_file=60, precision="fp32")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[str, pa.Table]:
    path = str(tmp_path_factory.mktemp("catalog") / "catalog")
    table = write_sample_catalog(path, CATALOG_ROWS, seed=7, rows_per_file=50)
    return path, table


@pytest.fixture(scope="module")
def embedded(ray_local, catalog, tiny_model_dir, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("emb") / "out")
    return out, run_embed(catalog[0], tiny_model_dir, out, OPTIONS)


def _read(out: str) -> pa.Table:
    return pq.read_table(out)  # a plain directory read: `_rejects/` and `_manifest.json` are skipped


def test_every_row_embedded_once_or_rejected_with_its_reason(embedded, catalog) -> None:
    out, manifest = embedded
    _, cat = catalog
    table, rejects = _read(out), pq.read_table(storage.join(out, REJECTS_DIR))
    ids = table.column("item_id").to_pylist()
    assert len(ids) == len(set(ids))  # every id at most once
    modalities = dict(zip(ids, table.column("modalities").to_pylist()))
    reject_reasons = list(zip(rejects.column("item_id").to_pylist(), rejects.column("reason").to_pylist()))

    for row in cat.to_pylist():
        expected = EXPECTED_OUTCOME.get(row["defect"], "image+title")
        if row["defect"] == "null_id":
            continue
        if row["defect"] == "duplicate_id":  # the later row is rejected; the earlier one (same id) is kept
            assert (row["item_id"], "duplicate_id") in reject_reasons
            assert row["item_id"] in modalities
        elif expected == "reject":
            assert (row["item_id"], row["defect"]) in reject_reasons, row
            assert row["item_id"] not in modalities
        else:
            assert modalities[row["item_id"]] == expected, row

    defects = pc.value_counts(cat.column("defect").drop_null()).to_pylist()
    defects = {d["values"]: d["counts"] for d in defects}
    assert manifest["rejects_by_reason"] == {k: defects[k] for k in ("duplicate_id", "no_content", "null_id")}
    assert sum(1 for i, r in reject_reasons if i is None and r == "null_id") == defects["null_id"]
    assert sum(manifest["image_errors"].values()) == defects["corrupt_image"] + defects["truncated_image"]
    assert set(rejects.column("stage").to_pylist()) <= {"validate", "preprocess"}


def test_counts_reconcile_and_manifest_is_complete(embedded, tiny_model_dir) -> None:
    out, manifest = embedded
    on_disk = storage.read_manifest(out)
    assert on_disk["rows_in"] == CATALOG_ROWS == manifest["rows_in"]
    assert manifest["rows_in"] == manifest["embedded"] + manifest["unchanged_skipped"] + manifest["rejected"]
    assert manifest["embedded"] == _read(out).num_rows
    assert manifest["rejected"] == pq.read_table(storage.join(out, REJECTS_DIR)).num_rows
    assert manifest["model_version"] == load_model_dir(tiny_model_dir)[0].config.model_version
    assert manifest["dim"] == 32
    assert manifest["precision"] == {"fp32": manifest["embedded"]} and manifest["resources"]["precision"] == "fp32"
    # written by the engine's tasks, a batch of at most rows_per_file rows each: part-<batch hash>-<publish token>
    token = manifest["files"][0].rsplit("-", 1)[1][:-len(".parquet")]  # unique to this publish
    assert len(manifest["files"]) >= -(-manifest["embedded"] // OPTIONS.rows_per_file)
    assert all(re.fullmatch(rf"part-[0-9a-f]{{16}}-{token}\.parquet", f) for f in manifest["files"]), manifest["files"]
    rows = [pq.ParquetFile(os.path.join(out, f)).metadata.num_rows for f in manifest["files"]]
    assert sum(rows) == manifest["embedded"] and max(rows) <= OPTIONS.rows_per_file
    assert manifest["fresh_files"] == manifest["files"]  # no previous table: every row was embedded tonight
    assert set(manifest["files"]) <= set(manifest["objects"])
    assert {f"{REJECTS_DIR}/{f}" for f in manifest["rejects"]["files"]} <= set(manifest["objects"])
    for stage in ("validate_s", "preprocess_s", "encode_s", "write_s", "wall_s"):
        assert manifest["timings"][stage] >= 0
    assert not any(".staging-" in p for p in os.listdir(os.path.dirname(out)))


def test_vectors_are_unit_norm_and_equal_direct_encode(embedded, catalog, tiny_model_dir) -> None:
    out, _ = embedded
    table = _read(out)
    vectors = storage.embedding_matrix(table.column("embedding"))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    cat = catalog[1].filter(pc.is_in(catalog[1].column("item_id"), table.column("item_id")))
    cat = cat.filter(pc.invert(pc.fill_null(pc.equal(cat.column("defect"), "duplicate_id"), False)))
    model, processor = load_model_dir(tiny_model_dir)
    titles = [t if t.strip() else "" for t in cat.column("title").to_pylist()]
    inputs = processor(titles, cat.column("image").to_pylist())
    import torch

    direct = model.encode(**{k: torch.from_numpy(inputs[k]) for k in ("input_ids", "attention_mask", "pixel_values", "has_image")})
    by_id = dict(zip(table.column("item_id").to_pylist(), vectors))
    got = np.stack([by_id[i] for i in cat.column("item_id").to_pylist()])
    np.testing.assert_allclose(got, direct.numpy(), atol=1e-5)


def test_output_reads_back_with_pyarrow_pandas_duckdb(embedded) -> None:
    out, manifest = embedded
    table = _read(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)  # no Ray tensor extension
    assert table.schema.field("embedded_at").type == pa.timestamp("us", tz="UTC")
    import pandas as pd

    df = pd.read_parquet(out)
    assert len(df) == manifest["embedded"] and len(df["embedding"].iloc[0]) == 32
    n, dim, n_ids, modalities = duckdb.sql(
        f"SELECT count(*), max(len(embedding)), count(DISTINCT item_id), count(DISTINCT modalities) "
        f"FROM read_parquet('{out}/*.parquet')"
    ).fetchall()[0]
    assert (n, dim, n_ids) == (manifest["embedded"], 32, manifest["embedded"]) and modalities == 3


def test_vectors_are_stored_plain_and_uncompressed(embedded) -> None:
    out, _ = embedded
    for path in glob.glob(f"{out}/*.parquet"):
        meta = pq.ParquetFile(path).metadata
        columns = {meta.row_group(0).column(c).path_in_schema: meta.row_group(0).column(c) for c in range(meta.num_columns)}
        vectors = columns["embedding.list.element"]
        assert vectors.compression == "UNCOMPRESSED" and "RLE_DICTIONARY" not in vectors.encodings, path
        assert columns["item_id"].compression == "SNAPPY"


def test_incremental_reencodes_only_changed_rows(embedded, catalog, tiny_model_dir, tmp_path) -> None:
    prev_out, _ = embedded
    cat = catalog[1]
    rows = cat.to_pylist()
    clean = [i for i, r in enumerate(rows) if r["defect"] is None]
    changed = {rows[i]["item_id"] for i in clean[:3]}
    for i in clean[:3]:
        rows[i]["title"] = rows[i]["title"] + " v2"
    removed = rows.pop(clean[3])["item_id"]
    new = [dict(rows[clean[4]], item_id=f"new-{k}", defect=None) for k in range(2)]
    updated = pa.Table.from_pylist(rows + new, schema=cat.schema)
    (tmp_path / "cat2").mkdir()
    pq.write_table(updated, tmp_path / "cat2" / "part-0.parquet")

    out = str(tmp_path / "out2")
    m = run_embed(str(tmp_path / "cat2"), tiny_model_dir, out, dataclasses_replace(OPTIONS, previous=prev_out))
    assert m["embedded"] == len(changed) + len(new)
    assert m["rows_in"] == m["embedded"] + m["unchanged_skipped"] + m["rejected"]
    before, after = _read(prev_out), _read(out)
    assert removed not in after.column("item_id").to_pylist()
    fresh = after.filter(pc.equal(after.column("embedded_at"), pa.scalar(m["created_at"]).cast(pa.timestamp("us", tz="UTC"))))
    assert set(fresh.column("item_id").to_pylist()) == changed | {"new-0", "new-1"}
    kept = after.filter(pc.invert(pc.is_in(after.column("item_id"), fresh.column("item_id")))).sort_by("item_id")
    old = before.filter(pc.is_in(before.column("item_id"), kept.column("item_id"))).sort_by("item_id")
    assert kept.num_rows == m["unchanged_skipped"] == old.num_rows
    assert kept.column("embedding").equals(old.column("embedding"))
    assert kept.column("embedded_at").equals(old.column("embedded_at"))


def dataclasses_replace(options: EmbedOptions, **changes) -> EmbedOptions:
    import dataclasses

    return dataclasses.replace(options, **changes)


def test_rerun_needs_overwrite_and_a_failed_run_publishes_nothing(embedded, catalog, tiny_model_dir, monkeypatch) -> None:
    out, manifest = embedded
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_embed(catalog[0], tiny_model_dir, out, OPTIONS)

    from pipeline import embed

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while publishing")

    monkeypatch.setattr(embed.storage, "publish", killed)
    with pytest.raises(KeyboardInterrupt):
        run_embed(catalog[0], tiny_model_dir, out + "-killed", OPTIONS)
    assert not storage.exists(out + "-killed")
    assert not [p for p in os.listdir(os.path.dirname(out)) if ".staging-" in p]
    assert storage.read_manifest(out) == json.loads(json.dumps(manifest, default=str))  # untouched


def test_a_killed_encode_actor_is_restarted_and_the_table_is_the_same(embedded, catalog, tiny_model_dir, tmp_path,
                                                                        monkeypatch) -> None:
    """SIGKILL the encode actor in the middle of a batch: Ray restarts it, the batch is retried, and the
    published table equals the uninterrupted run's: no row lost, none twice, counts reconcile."""
    from pipeline import encode
    from tests.faults import killed_once

    marker = str(tmp_path / "killed")
    monkeypatch.setattr(encode, "Encoder", killed_once(encode.Encoder, marker, at_call=2))
    out = str(tmp_path / "out")
    manifest = run_embed(catalog[0], tiny_model_dir, out, OPTIONS)
    assert os.path.exists(marker)  # the actor was killed
    reference, m_ref = _read(embedded[0]), embedded[1]
    table = _read(out)
    assert table.num_rows == reference.num_rows == len(set(table.column("item_id").to_pylist()))
    assert {k: manifest[k] for k in ("rows_in", "embedded", "rejected", "rejects_by_reason")} == \
        {k: m_ref[k] for k in ("rows_in", "embedded", "rejected", "rejects_by_reason")}
    by_id = lambda t: dict(zip(t.column("item_id").to_pylist(), t.column("embedding").to_pylist()))  # noqa: E731
    ours, theirs = by_id(table), by_id(reference)
    assert ours.keys() == theirs.keys()
    assert max(abs(a - b) for i in ours for a, b in zip(ours[i], theirs[i])) < 1e-5


def test_a_write_task_killed_after_writing_is_retried_and_rewrites_its_own_files(embedded, catalog, tiny_model_dir,
                                                                                  tmp_path, monkeypatch) -> None:
    """SIGKILL a write task after its files are on disk and before it returns: Ray retries it on the same
    batch, which rewrites the same file names (named by the batch's ids): no row twice, none lost."""
    from pipeline import embed
    from tests.faults import killed_after_once

    marker = str(tmp_path / "killed")
    monkeypatch.setattr(embed, "write_parts", killed_after_once(embed.write_parts, marker))
    out = str(tmp_path / "out")
    manifest = run_embed(catalog[0], tiny_model_dir, out, OPTIONS)
    assert os.path.exists(marker)  # a write task was killed
    on_disk = sorted(f for f in os.listdir(out) if f.endswith(".parquet"))
    assert on_disk == sorted(manifest["files"])  # no orphan file of the killed attempt
    table, reference = _read(out), _read(embedded[0])
    assert sorted(table.column("item_id").to_pylist()) == sorted(reference.column("item_id").to_pylist())
    assert manifest["rejected"] == embedded[1]["rejected"] == pq.read_table(os.path.join(out, REJECTS_DIR)).num_rows


def test_schema_error_fails_before_any_work(ray_local, tiny_model_dir, tmp_path) -> None:
    pq.write_table(pa.table({"item_id": ["1"], "name": ["a"], "image": pa.array([None], pa.binary())}), tmp_path / "c.parquet")
    with pytest.raises(CatalogSchemaError, match="--column-map title=NAME"):
        run_embed(str(tmp_path / "c.parquet"), tiny_model_dir, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == ["c.parquet"]


def test_preprocess_and_encoder_work_without_ray(tiny_model_dir) -> None:
    table = make_sample_catalog(60, seed=3).select(["item_id", "title", "image"])
    prep = Preprocess(tiny_model_dir, ColumnMap())
    first = prep(table)
    assert len(first["item_id"]) == 60 and set(first["status"]) <= {"ok", "reject"}
    # the incremental embed's join adds the previous table's columns: row i is unchanged, row j was edited
    i, j = np.flatnonzero(first["status"] == "ok")[:2]
    hashes = [None] * 60
    hashes[i], hashes[j] = first["content_hash"][i], "an older hash"
    vectors = [None] * 60
    vectors[i] = vectors[j] = [0.5] * 32
    joined = table.append_column("_previous_hash", pa.array(hashes, pa.string())).append_column(
        "_previous_embedding", pa.array(vectors, pa.list_(pa.float32(), 32)))
    out = prep(joined)
    assert out["status"][i] == "unchanged" and out["status"][j] == "ok"
    assert [k for k, s in enumerate(out["status"]) if s != first["status"][k]] == [i]
    assert out["_previous_embedding"].shape == (60, 32) and out["_previous_embedding"][i].tolist() == [0.5] * 32
    assert not np.delete(out["_previous_embedding"], [i, j], axis=0).any()
    encoded = Encoder(tiny_model_dir, device="cpu", num_threads=1)(out)
    assert encoded["embedding"].shape == (60, 32) and "pixel_values" not in encoded
    assert encoded["_previous_embedding"][i].tolist() == [0.5] * 32  # passed through to the writer
    ok = out["status"] == "ok"
    np.testing.assert_allclose(np.linalg.norm(encoded["embedding"][ok], axis=1), 1.0, atol=1e-5)
    assert not encoded["embedding"][~ok].any()


def test_bf16_vectors_are_the_fp32_ones_to_rounding_and_auto_is_bf16_only_where_it_is_native(catalog, tiny_model_dir) -> None:
    import torch

    table = catalog[1].slice(0, 48)
    prepared = Preprocess(tiny_model_dir, ColumnMap())(table)
    ok = prepared["status"] == "ok"
    inputs = {k: v[ok] for k, v in prepared.items()}
    fp32, bf16 = (Encoder(tiny_model_dir, "cpu", precision=p) for p in ("fp32", "bf16"))
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    a, b = fp32.encode(inputs), bf16.encode(inputs)
    cosines = (a * b).sum(axis=1)
    assert cosines.min() > 0.99 and not np.allclose(a, b, atol=1e-6), cosines.min()  # bf16 really ran
    # the centring, whitening and normalising ran in fp32 (in bf16, norms are off by ~1e-3)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert list(bf16(prepared)["_precision"]) == ["bf16"] * len(ok)  # what the writer counts per row
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_precision("auto", cuda) == "bf16" and resolve_precision("fp32", cuda) == "fp32"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16", cpu)


def test_s3_round_trip(ray_local, s3_env, catalog, tiny_model_dir) -> None:
    fs, _ = storage.get_fs("s3://embed-test")
    fs.mkdir("embed-test")
    fs.put(catalog[0], "embed-test/catalog", recursive=True)
    manifest = run_embed("s3://embed-test/catalog", tiny_model_dir, "s3://embed-test/out", OPTIONS)
    assert storage.read_manifest("s3://embed-test/out")["embedded"] == manifest["embedded"]
    with fs.open(f"embed-test/out/{manifest['files'][0]}", "rb") as f:
        first = pq.read_table(f)
    assert first.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    total = sum(pq.ParquetFile(fs.open(f"embed-test/out/{name}", "rb")).metadata.num_rows for name in manifest["files"])
    assert total == manifest["embedded"] and manifest["rows_in"] == CATALOG_ROWS
    assert fs.exists(f"embed-test/out/{REJECTS_DIR}/{manifest['rejects']['files'][0]}")
    assert not [p for p in fs.ls("embed-test") if ".staging-" in p]


def test_cli_embed_help_and_errors(tiny_model_dir, tmp_path) -> None:
    from click.testing import CliRunner

    from jobs.cli import main

    runner = CliRunner()
    help_text = runner.invoke(main, ["embed", "--help"]).output
    for option in ("--batch-size", "--concurrency", "--gpu", "--previous", "--column-map", "--overwrite"):
        assert option in help_text
    assert "Example:" in help_text
    pq.write_table(pa.table({"item_id": ["1"], "title": ["a"]}), tmp_path / "c.parquet")
    result = runner.invoke(main, ["embed", str(tmp_path / "c.parquet"), tiny_model_dir, str(tmp_path / "o")])
    assert result.exit_code == 1 and "image_uri=NAME" in result.output  # fails before ray.init
    result = runner.invoke(main, ["embed", str(tmp_path / "c.parquet"), tiny_model_dir, "o", "--column-map", "x=y"])
    assert result.exit_code == 1 and "unknown" in result.output


def test_a_model_dir_on_s3_is_fetched_once_and_embeds_as_the_local_one(ray_local, s3_env, catalog, tiny_model_dir,
                                                                         tmp_path, monkeypatch) -> None:
    """The cluster path: model dirs live on object storage; each machine copies one version once."""
    monkeypatch.setattr(storage, "MODEL_CACHE", str(tmp_path / "cache"))
    fs, _ = storage.get_fs("s3://models")
    fs.mkdir("models")
    fs.put(tiny_model_dir, "models/tiny", recursive=True)
    local = storage.local_dir("s3://models/tiny")
    assert storage.local_dir("s3://models/tiny") == local and len(os.listdir(tmp_path / "cache")) == 1  # fetched once
    assert sorted(os.listdir(local)) == sorted(os.listdir(tiny_model_dir))
    with pytest.raises(FileNotFoundError, match="not a model dir"):
        storage.local_dir("s3://models/none")

    options = dataclasses.replace(OPTIONS, concurrency=1)
    from_s3 = run_embed(catalog[0], "s3://models/tiny", str(tmp_path / "from-s3"), options)
    from_disk = run_embed(catalog[0], tiny_model_dir, str(tmp_path / "from-disk"), options)
    assert from_s3["model_version"] == from_disk["model_version"] and from_s3["embedded"] == from_disk["embedded"]
    a, b = (pq.read_table(storage.parquet_files(str(tmp_path / d)), columns=["item_id", "embedding"]).sort_by("item_id")
            for d in ("from-s3", "from-disk"))
    np.testing.assert_allclose(storage.embedding_matrix(a.column("embedding")), storage.embedding_matrix(b.column("embedding")), atol=1e-6)
