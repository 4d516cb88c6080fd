"""Storage helpers: one filesystem API for local paths and s3://, atomic publish, manifests, the embedding column.

Every output of the product is a *published directory*: data files plus a `_manifest.json`. The
manifest is written last, and readers treat a directory without it as not written. Outputs are built in
a run-scoped staging directory next to the destination and moved into place only when complete:

- local: one `os.rename` of the whole staging directory (atomic on POSIX); an existing output being
  overwritten is first renamed aside, and deleted only after the new one is in place;
- s3:// (no rename): every publish names its data files uniquely (`part_name`: `part-00000-<token>.parquet`),
  so the new objects are copied server-side beside the old output's without touching them; the new
  manifest, which lists its objects, is the commit point (a single PUT, atomic on S3); only then are the
  objects of the replaced output deleted. Readers take the files the manifest lists (`parquet_files`), so
  they see the old output or the new one, never neither and never a mix; a run killed mid-copy leaves
  the old output whole (and orphan objects that the next publish removes).

S3 credentials come from the environment (AWS_ACCESS_KEY_ID, ...); the endpoint can be overridden with
AWS_ENDPOINT_URL (MinIO, moto, ...), which botocore reads itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import ray.data

MANIFEST = "_manifest.json"
# where model dirs on object storage are copied to on each machine (override: ITEM_PIPELINE_MODEL_CACHE)
MODEL_CACHE = os.environ.get("ITEM_PIPELINE_MODEL_CACHE", os.path.join(tempfile.gettempdir(), "item-pipeline-models"))


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and bare path for a local path or an s3:// URI.

    fsspec caches filesystem instances by their arguments: the endpoint is passed explicitly so that a
    changed AWS_ENDPOINT_URL gets a new client instead of a cached one that talks to the old endpoint.
    """
    options = {}
    if uri.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = get_fs(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    """The whole object at a local path or s3:// URI (a listing's photo by `image_uri`)."""
    fs, path = get_fs(uri)
    return fs.cat_file(path)


def read_json(uri: str) -> dict[str, Any]:
    fs, path = get_fs(uri)
    with fs.open(path, "r") as f:
        return json.load(f)


def write_json(uri: str, obj: dict[str, Any]) -> None:
    """Write JSON so that a reader never sees half a file (temp + rename locally; one PUT on S3)."""
    fs, path = get_fs(uri)
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    if is_local(uri):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    else:
        with fs.open(path, "w") as f:
            f.write(text)


def is_published(uri: str) -> bool:
    """True when `uri` is a directory whose manifest has been written."""
    return exists(join(uri, MANIFEST))


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a published directory; a clear error when the directory is not published."""
    if not is_published(uri):
        raise FileNotFoundError(
            f"{uri} is not a published output (no {MANIFEST}): it is missing, or the run that wrote it "
            "did not finish. Re-run the stage that produces it."
        )
    return read_json(join(uri, MANIFEST))


def staging_uri(final_uri: str, run_id: str | None = None) -> str:
    """A run-scoped staging location beside `final_uri` (same filesystem, so the publish is a rename):
    `<final>.staging-[<run id>-]<token>`, the token (8 hex digits) unique to this publish (see part_name)."""
    token = uuid.uuid4().hex[:8]
    return f"{final_uri.rstrip('/')}.staging-{run_id + '-' if run_id else ''}{token}"


def part_name(stage: str, name: str) -> str:
    """A data file name unique to the publish that `stage` becomes: 'part-00000.parquet' ->
    'part-00000-<token>.parquet' (as Spark names its parts). On an object store the new output's files
    then lie beside the old one's until the new manifest commits (see publish)."""
    token = stage.rstrip("/").rsplit(".staging-", 1)[1].rsplit("-", 1)[-1]
    stem, dot, ext = name.partition(".")
    return f"{stem}-{token}{dot}{ext}"


def check_can_publish(final_uri: str, overwrite: bool) -> None:
    """Fail before any work when the destination is already published and overwrite was not asked for."""
    if is_published(final_uri) and not overwrite:
        raise FileExistsError(
            f"{final_uri} is already published. Pass --overwrite to replace it, or choose another output."
        )


def publish(staging: str, final_uri: str, manifest: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    """Write `manifest` (plus `objects`: the relative path of every file published) into place and move
    the staging directory's content to `final_uri` atomically, as the module docstring says. Returns the
    manifest as written.

    Never deletes a published output before its replacement is in place.
    """
    check_can_publish(final_uri, overwrite)
    fs, final_path = get_fs(final_uri)
    _, staging_path = get_fs(staging)
    root = staging_path.rstrip("/")
    objects = sorted(p[len(root) + 1 :] for p in fs.find(root) if p[len(root) + 1 :] != MANIFEST)
    manifest = {**manifest, "objects": objects}
    if is_local(final_uri):
        write_json(join(staging, MANIFEST), manifest)
        aside = None
        if os.path.exists(final_path):
            aside = f"{final_path}.replaced-{uuid.uuid4().hex[:8]}"
            os.rename(final_path, aside)
        os.makedirs(os.path.dirname(os.path.abspath(final_path)), exist_ok=True)
        os.rename(staging_path, final_path)
        if aside:
            fs.rm(aside, recursive=True)
        return manifest
    # object store: copy beside the old output (unique data names), commit with the manifest, then clean
    for rel in objects:
        fs.copy(join(root, rel), join(final_path, rel))
    write_json(join(final_uri, MANIFEST), manifest)
    keep = {*objects, MANIFEST}
    final_root = final_path.rstrip("/")
    stale = [p for p in fs.find(final_root) if p[len(final_root) + 1 :] not in keep]
    if stale:
        fs.rm(stale)
    fs.rm(staging_path, recursive=True)
    return manifest


def parquet_files(uri: str) -> list[str]:
    """The Parquet files of a directory (sorted), skipping `_`/`.`-prefixed paths below it, as Spark,
    pyarrow and DuckDB do: `_rejects/` and staging leftovers are not data. A file URI is itself.

    In a published directory (or a folder of one, like dedup's `duplicate_pairs/`) the files are those its
    manifest lists, not whatever the listing shows: on an object store an overwrite in progress holds the
    old output's files and the new one's side by side.
    """
    fs, path = get_fs(uri)
    if not fs.isdir(path):
        return [path]
    root = path.rstrip("/")
    published = _published_objects(fs, root)
    candidates = published if published is not None else fs.find(root)
    return sorted(
        p for p in candidates if p.endswith(".parquet")
        and not any(part.startswith(("_", ".")) for part in p[len(root) + 1 :].split("/"))
    )


def read_dataset(files: list[str], filesystem: Any, columns: list[str] | None = None) -> "ray.data.Dataset":
    """Parquet files already listed (parquet_files, catalog.open_dataset) as a Ray dataset of `columns`.

    Through Ray Data's V1 Parquet source, chosen by Ray's own `use_datasource_v2` switch for this call: its
    read tasks take the files as given. The V2 source (Ray 2.60's default) lists them again and reads their
    footers on a pool of up to 32 actors per read, a new process each (~3 s of imports apiece on a 2-core
    machine: a 160-row nightly run is 1.51x faster without it, bench/bench_nightly_startup.py); it also
    drops a file named without `.parquet`, whatever `file_extensions` says."""
    import ray.data

    context = ray.data.DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, filesystem=filesystem, columns=columns, file_extensions=None)
    finally:
        context.use_datasource_v2 = v2


def _published_objects(fs: fsspec.AbstractFileSystem, root: str) -> list[str] | None:
    """Full paths of the objects under `root` that the manifest of `root` or of its parent lists; None
    when neither is published or the manifest predates object lists."""
    for base in (root, root.rsplit("/", 1)[0]):
        manifest_path = f"{base}/{MANIFEST}"
        if fs.exists(manifest_path):
            with fs.open(manifest_path, "r") as f:
                objects = json.load(f).get("objects")
            if objects is None:
                return None
            paths = [f"{base}/{o}" for o in objects]
            return [p for p in paths if p.startswith(root + "/")]
    return None


def local_dir(uri: str, version_file: str = "model_version") -> str:
    """A local directory with the content of the directory at `uri` (a model dir): `uri` itself when local;
    for s3://, a copy under MODEL_CACHE named by the URI and the content of its `version_file`, fetched once
    per machine and version. The copy is made aside and renamed into place, so processes that fetch at the
    same time (one encode actor each) never read a half copy; a new version of the dir gets a new copy."""
    if is_local(uri):
        return uri
    fs, path = get_fs(uri)
    path = path.rstrip("/")
    try:
        version = fs.cat_file(f"{path}/{version_file}").decode().strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} has no {version_file}: not a model dir (make one with `item-pipeline pretrain`)") from None
    key = hashlib.sha256(f"{uri.rstrip('/')}\n{version}".encode()).hexdigest()[:16]
    local = os.path.join(MODEL_CACHE, f"{version}-{key}")
    if os.path.isdir(local):
        return local
    os.makedirs(MODEL_CACHE, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key}-", dir=MODEL_CACHE)
    try:
        for remote in fs.find(path):
            target = os.path.join(tmp, remote[len(path) + 1 :])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.get_file(remote, target)
        try:
            os.rename(tmp, local)
        except OSError:  # another process put the same version in place first: use that one
            if not os.path.isdir(local):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def forget_listings(uri: str) -> None:
    """Drop what this process's filesystem client has cached of the listings under `uri` (s3fs keeps them):
    needed after another process (a Ray task) published there."""
    fs, path = get_fs(uri)
    fs.invalidate_cache(path)


def remove(uri: str) -> None:
    """Delete a file or directory tree if it exists (staging leftovers)."""
    fs, path = get_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@contextlib.contextmanager
def staging(final_uri: str, run_id: str | None = None) -> Iterator[str]:
    """A fresh staging directory for `final_uri`, removed if the block raises."""
    uri = staging_uri(final_uri, run_id)
    remove(uri)
    fs, path = get_fs(uri)
    fs.makedirs(path, exist_ok=True)
    try:
        yield uri
    except BaseException:
        remove(uri)
        raise


# --- the embedding column -------------------------------------------------------------------------


def write_part(stage: str, rows: pa.Table, ids: list, prefix: str = "part", row_group_rows: int | None = None) -> str:
    """`rows` as one part file of the output's `stage` (the folder of `prefix`, e.g. "_rejects/part", inside
    it), named by a hash of `ids` (the batch's ids): a task retried on the same batch rewrites its own file
    instead of adding a second. Returns the file's path relative to `stage`."""
    token = hashlib.blake2b("\n".join(map(str, ids)).encode(), digest_size=8).hexdigest()
    name = part_name(stage, f"{prefix}-{token}.parquet")
    fs, path = get_fs(join(stage, name))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(rows, f, row_group_size=row_group_rows, **parquet_options(rows.schema))
    return name


def parquet_options(schema: pa.Schema) -> dict:
    """pyarrow Parquet write options for a table of `schema`: its vector columns (fixed_size_list) PLAIN and
    uncompressed (float vectors neither dictionary-encode nor compress, and decoding them is what every scan
    of an embedding table pays), the other columns dictionary-encoded and snappy, pyarrow's defaults."""
    vectors = {f.name for f in schema if pa.types.is_fixed_size_list(f.type)}
    if not vectors:
        return {}
    return {"use_dictionary": [f.name for f in schema if f.name not in vectors],
            "compression": {f.name: "none" if f.name in vectors else "snappy" for f in schema}}


def embedding_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """[N, D] float32 -> a plain Arrow `fixed_size_list<float32>[D]` (not Ray's tensor extension)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {vectors.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def embedding_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A `fixed_size_list<float32>[D]` column -> [N, D] float32 numpy, without a Python loop; a null row
    (a left join's unmatched row) is all zeros."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise TypeError(f"embedding column must be fixed_size_list<float32>[D], got {column.type}")
    dim = column.type.list_size
    if column.null_count:
        matrix = np.zeros((len(column), dim), dtype=np.float32)
        valid = column.is_valid()
        matrix[valid.to_numpy(zero_copy_only=False)] = embedding_matrix(column.filter(valid))
        return matrix
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)


def remove_stale_staging(final_uri: str) -> list[str]:
    """Delete the staging directories that killed runs left beside `final_uri`; returns what was removed.

    Only safe when no other run is writing `final_uri` (the nightly job runs one date at a time).
    """
    fs, path = get_fs(final_uri)
    parent, name = path.rstrip("/").rsplit("/", 1)
    if not fs.exists(parent):
        return []
    stale = [p for p in fs.ls(parent, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith(f"{name}.staging-")]
    for p in stale:
        fs.rm(p, recursive=True)
    return stale
