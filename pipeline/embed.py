"""The embedding job: catalog Parquet -> validate -> decode/tokenise (CPU tasks) -> encode (actor pool) ->
embedding table + rejects table, published atomically with its manifest.

    catalog.read_rows(needed columns)     Ray read tasks
      (--previous) -> join                a left join (Ray Data, hash-shuffled) with the previous table's rows of
                                          this model version on the id: an unchanged row carries its embedding
                                          through, is never decoded or encoded, and gets files of its own
      -> rows.Preprocess                  CPU tasks: validate rows, hash, tokenise, decode (uint8 pixels)
      -> encode.Encoder                   actor pool: model loaded once per actor, GPU (bf16) or CPU
      -> write_parts                      CPU tasks, batches of rows_per_file rows: split by `status` into part
                                          files of the staging dir (embedded, carried, rejects); the driver
                                          gets one row of counts and file names per batch, never the rows
    -> storage.publish(staging, OUT)      `_manifest.json` last: the commit point

The pipeline is a single pass: every row leaves Preprocess with a `status` (ok / reject / unchanged)
and its reason, and the write stage splits on it. The previous table reaches the rows through the engine's
join, not as a dict held by the driver and sent to every task. `Preprocess`, `Encoder` and `write_parts`
know nothing of Ray: each is a plain class or function called on a batch, testable without a cluster. Resources
(batch size, actor pool size, GPUs per actor, torch threads) are arguments; `ray.init` is the caller's
business.

Duplicate ids need a global view: a cheap pass over the id column (ids only, shuffled over tasks by a hash
of the id: pipeline/id_shuffle.py) finds them before the heavy stages. Rows with a duplicated id are taken
out of the streaming read and handled from a small driver-side table: the first occurrence (sorted file
order, then row order) is embedded, every later one rejected.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import storage
from .catalog import ColumnMap, duplicate_ids, id_as_string, open_dataset, read_rows, validate_schema
from .id_shuffle import id_parts
from .progress import Progress
from .rows import OK, PREVIOUS, PREVIOUS_HASH, REJECT, UNCHANGED, Preprocess

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 8192  # rows per Parquet row group of the output tables
# the incremental embed's join: about this many catalog rows per partition, at most this many partitions
JOIN_PARTITION_ROWS, JOIN_PARTITIONS_MAX = 200_000, 256
REJECTS_DIR = "_rejects"  # inside OUT: Parquet readers skip `_`-prefixed paths, publish moves it with OUT

EMBEDDING_COLUMNS = ("item_id", "embedding", "modalities", "content_hash", "model_version", "embedded_at")
REJECTS_SCHEMA = pa.schema([
    ("item_id", pa.string()),  # null for a null id
    ("stage", pa.string()),  # validate (id checks) | preprocess (content checks)
    ("reason", pa.string()),  # null_id | duplicate_id | no_content | unusable_image_no_title
    ("detail", pa.string()),  # human-readable: the decoder's message, the row that won a duplicate id
])


def embedding_schema(dim: int) -> pa.Schema:
    """The embedding table (ARCHITECTURE.md): plain Arrow types every Parquet reader understands."""
    return pa.schema([
        ("item_id", pa.string()),
        ("embedding", pa.list_(pa.float32(), dim)),  # fixed_size_list<float32>[D], L2-normalised
        ("modalities", pa.string()),  # image+title | title | image
        ("content_hash", pa.string()),  # catalog.content_hash(title, image bytes)
        ("model_version", pa.string()),
        ("embedded_at", pa.timestamp("us", tz="UTC")),
    ])


@dataclasses.dataclass(frozen=True)
class EmbedOptions:
    """How to run the job. Resources are decided by the caller (CLI, jobs/), never here."""

    batch_size: int = 256  # rows per preprocess and per encode call
    concurrency: int = 1  # encode actors in the pool
    num_gpus: float = 0  # GPUs per encode actor; > 0 means cuda (bf16 under precision auto)
    encode_cpus: float = 1  # CPUs Ray reserves per encode actor
    encode_threads: int | None = None  # torch threads per encode actor; None = torch's default
    precision: str = "auto"  # encode.PRECISIONS: bf16 where the device has it natively (GPU, recent CPUs), else fp32
    previous: str | None = None  # a published embedding table: unchanged rows are carried over
    columns: ColumnMap = dataclasses.field(default_factory=ColumnMap)
    overwrite: bool = False  # replace a published OUT
    rows_per_file: int = 100_000  # at most this many rows per output part file (one write task's batch)
    run_id: str | None = None  # names the staging dir; random when None


# --- write (a Ray Data stage: no row reaches the driver) ---------------------------------------------


def write_parts(batch: dict[str, np.ndarray], stage: str, model_version: str, created_at: dt.datetime) -> pa.Table:
    """One batch of the encoder's output (at most rows_per_file rows) -> up to three part files of `stage`,
    split by `status`: `part-<h>` (rows embedded in this run), `part-carried-<h>` (unchanged rows, as they
    were in the previous table) and `_rejects/part-<h>`, all named by a hash of the batch's ids, so a
    retried task rewrites its own files. Returns one row for the driver: the files and the counts."""
    start = time.perf_counter()
    status, ids = batch["status"], batch["item_id"].tolist()
    dim = batch["embedding"].shape[1]
    row_group = {"ids": ids, "row_group_rows": ROW_GROUP_ROWS}
    out: dict[str, Any] = {"rows": len(status), "dim": dim, "fresh_file": "", "carried_file": "", "rejects_file": ""}
    ok = np.flatnonzero(status == OK)
    if len(ok):
        out["fresh_file"] = storage.write_part(stage, pa.table({
            "item_id": pa.array(batch["item_id"][ok], pa.string()),
            "embedding": storage.embedding_array(batch["embedding"][ok]),
            "modalities": pa.array(batch["modalities"][ok], pa.string()),
            "content_hash": pa.array(batch["content_hash"][ok], pa.string()),
            "model_version": pa.array([model_version] * len(ok), pa.string()),
            "embedded_at": pa.array([created_at] * len(ok), pa.timestamp("us", tz="UTC")),
        }, schema=embedding_schema(dim)), **row_group)
    same = np.flatnonzero(status == UNCHANGED)
    if len(same):
        out["carried_file"] = storage.write_part(stage, pa.table({
            "item_id": pa.array(batch["item_id"][same], pa.string()),
            "embedding": storage.embedding_array(batch[PREVIOUS + "embedding"][same]),
            "modalities": pa.array(batch[PREVIOUS + "modalities"][same], pa.string()),
            "content_hash": pa.array(batch["content_hash"][same], pa.string()),
            "model_version": pa.array([model_version] * len(same), pa.string()),
            "embedded_at": pa.array(batch[PREVIOUS + "embedded_at"][same]).cast(pa.timestamp("us", tz="UTC")),
        }, schema=embedding_schema(dim)), prefix="part-carried", **row_group)
    bad = np.flatnonzero(status == REJECT)
    reasons = batch["reason"][bad].tolist()
    if len(bad):
        out["rejects_file"] = storage.write_part(stage, pa.table({
            "item_id": [None if r == "null_id" else i for r, i in zip(reasons, batch["item_id"][bad].tolist())],
            "stage": batch["stage"][bad].tolist(), "reason": reasons, "detail": batch["detail"][bad].tolist(),
        }, schema=REJECTS_SCHEMA), prefix=f"{REJECTS_DIR}/part", **row_group)
    counts = {
        "embedded": len(ok), "unchanged": len(same), "rejected": len(bad),
        "rejects_by_reason": collections.Counter(reasons),
        "modalities": collections.Counter(batch["modalities"][ok].tolist()),
        "image_errors": collections.Counter(e.split(":", 1)[0] for e in batch["image_error"][ok].tolist() if e),
        "precision": collections.Counter(batch["_precision"][ok].tolist()),
        "preprocess_s": float(batch["_preprocess_s"].sum()), "encode_s": float(batch["_encode_s"].sum()),
        "write_s": time.perf_counter() - start,
    }
    return pa.table({**{k: [v] for k, v in out.items()}, "counts": [json.dumps(counts)]})


# --- the job ---------------------------------------------------------------------------------------


def _previous_rows(previous_uri: str, model_version: str, id_column: str) -> ray.data.Dataset:
    """The right side of the incremental embed's join: the previous table's rows embedded by this same
    model version, keyed by the catalog's id column, their other columns renamed `_previous_*`."""
    storage.read_manifest(previous_uri)  # a clear error when it is not a published table
    fs, _ = storage.get_fs(previous_uri)
    ds = storage.read_dataset(storage.parquet_files(previous_uri), fs, list(EMBEDDING_COLUMNS))
    return ds.map_batches(_as_previous, fn_args=(model_version, id_column), batch_format="pyarrow")


def _as_previous(table: pa.Table, model_version: str, id_column: str) -> pa.Table:
    table = table.filter(pc.equal(table.column("model_version"), model_version))
    return pa.table({
        id_column: table.column("item_id"),
        PREVIOUS_HASH: table.column("content_hash"),
        **{PREVIOUS + name: table.column(name) for name in ("embedding", "modalities", "embedded_at")},
    })


def _string_ids(table: pa.Table, id_column: str, drop: frozenset[str] = frozenset()) -> pa.Table:
    """The id column as strings (the join key's type), without the rows whose id is in `drop`."""
    i = table.schema.get_field_index(id_column)
    table = table.set_column(i, id_column, id_as_string(table.column(i)))
    if drop:
        table = table.filter(pc.invert(pc.fill_null(pc.is_in(table.column(i), pa.array(sorted(drop), pa.string())), False)))
    return table


def _split_duplicates(catalog_uri: str, columns: ColumnMap, needed: list[str], dup: set[str]) -> tuple[pa.Table, pa.Table]:
    """Rows with a duplicated id -> (first occurrences to embed, rejects for every later one)."""
    ds = open_dataset(catalog_uri)
    id_expr = pc.field(columns.item_id).cast(pa.string())
    rows = ds.to_table(columns=needed, filter=id_expr.isin(sorted(dup)))  # sorted files, row order
    ids = id_as_string(rows.column(columns.item_id)).to_pylist()
    first: dict[str, int] = {}
    losers: list[int] = []
    for i, item_id in enumerate(ids):
        if item_id in first:
            losers.append(i)
        else:
            first[item_id] = i
    rejects = pa.table(
        {
            "item_id": [ids[i] for i in losers],
            "stage": ["validate"] * len(losers),
            "reason": ["duplicate_id"] * len(losers),
            "detail": ["an earlier row (sorted file order, then row order) has this id and is the one kept"] * len(losers),
        },
        schema=REJECTS_SCHEMA,
    )
    return rows.take(sorted(first.values())), rejects


def run_embed(catalog_uri: str, model_dir: str, out_uri: str, options: EmbedOptions | None = None) -> dict[str, Any]:
    """Embed every row of the catalog at `catalog_uri` with the model at `model_dir` and publish the
    embedding table (and `_rejects/`) at `out_uri`. Returns the manifest.

    Raises `CatalogSchemaError` (bad schema) or `FileExistsError` (published output, no overwrite) before
    any work. Ray must already be initialised by the caller.
    """
    import ray

    # The model code (torch, transformers) loads here rather than at the top: Ray pickles this module's batch
    # functions (_string_ids, _as_previous, write_parts) into its read and write tasks by reference, and
    # each task process imports the module to run them (~5 s each with torch, ~1 s without).
    from item_model import read_model_version

    from .encode import PRECISIONS, Encoder

    options = options or EmbedOptions()
    columns = options.columns
    wall_start = time.perf_counter()
    created_at = dt.datetime.now(dt.timezone.utc)
    timings: dict[str, float] = {}

    # validate: options, schema, destination, duplicate ids (ids only), previous table
    if options.precision not in PRECISIONS:
        raise ValueError(f"EmbedOptions.precision must be one of {', '.join(PRECISIONS)}, got {options.precision!r}")
    storage.check_can_publish(out_uri, options.overwrite)
    _, needed = validate_schema(catalog_uri, columns)
    model_version = read_model_version(storage.local_dir(model_dir))  # s3://: fetched once per machine
    # the ids shuffled by a hash into parts (id_shuffle.ID_BUCKET_ROWS each), one task counting each: no process
    # holds every id
    parts, rows_in = id_parts(catalog_uri, [columns.item_id], columns.item_id)
    dup = set().union(*ray.get([ray.remote(duplicate_ids).options(num_cpus=1).remote(*part) for part in parts]))
    previous = _previous_rows(options.previous, model_version, columns.item_id) if options.previous else None
    winners, dup_rejects = _split_duplicates(catalog_uri, columns, needed, dup) if dup else (None, None)
    timings["validate_s"] = time.perf_counter() - wall_start

    # the rows: every duplicated id's rows leave the read, its first occurrence comes back from `winners`
    rows = read_rows(catalog_uri, needed)
    if dup or previous is not None:
        rows = rows.map_batches(_string_ids, fn_args=(columns.item_id, frozenset(dup)), batch_format="pyarrow")
    if winners is not None and winners.num_rows:
        rows = rows.union(ray.data.from_arrow(_string_ids(winners, columns.item_id)))
    if previous is not None:
        rows = rows.join(previous, join_type="left_outer", on=(columns.item_id,),
                         num_partitions=max(1, min(JOIN_PARTITIONS_MAX, rows_in // JOIN_PARTITION_ROWS)))
    ds = rows.map_batches(Preprocess(model_dir, columns), batch_format="pyarrow", batch_size=options.batch_size, num_cpus=1)
    ds = ds.map_batches(
        Encoder,
        fn_constructor_kwargs=dict(
            model_dir=model_dir, device="cuda" if options.num_gpus > 0 else "cpu", num_threads=options.encode_threads,
            precision=options.precision,
        ),
        compute=ray.data.ActorPoolStrategy(size=options.concurrency),
        num_gpus=options.num_gpus, num_cpus=options.encode_cpus,
        batch_size=options.batch_size, batch_format="numpy",
    )

    with storage.staging(out_uri, options.run_id) as stage:
        # the write stage: batches of at most rows_per_file rows, each written by a task as its own files
        written = ds.map_batches(write_parts, fn_args=(stage, model_version, created_at), batch_format="numpy",
                                 batch_size=options.rows_per_file, num_cpus=1)
        files: dict[str, list[str]] = {"fresh_file": [], "carried_file": [], "rejects_file": []}
        totals: collections.Counter = collections.Counter()
        reject_reasons: collections.Counter[str] = collections.Counter()
        image_errors: collections.Counter[str] = collections.Counter()
        modalities: collections.Counter[str] = collections.Counter()
        precision: collections.Counter[str] = collections.Counter()
        if dup_rejects is not None:
            files["rejects_file"].append(storage.write_part(stage, dup_rejects, dup_rejects["item_id"].to_pylist(),
                                                            prefix=f"{REJECTS_DIR}/part-duplicates"))
            reject_reasons["duplicate_id"] += dup_rejects.num_rows
            totals["rejected"] += dup_rejects.num_rows
        dim = None
        pipeline_start = time.perf_counter()
        progress = Progress(log, "embed", rows_in - (dup_rejects.num_rows if dup_rejects is not None else 0))
        for part in written.iter_rows():  # one small row per written batch
            progress.update(part["rows"])
            dim = part["dim"]
            for kind, names in files.items():
                if part[kind]:
                    names.append(part[kind])
            counts = json.loads(part["counts"])
            reject_reasons.update(counts.pop("rejects_by_reason"))
            image_errors.update(counts.pop("image_errors"))
            modalities.update(counts.pop("modalities"))
            precision.update(counts.pop("precision"))
            totals.update(counts)
        pipeline_s = time.perf_counter() - pipeline_start
        progress.finish()
        storage.forget_listings(stage)  # the tasks wrote there: this process's client may have listed it before

        if dim is None:  # nothing reached the encoder (empty catalog, or only duplicate losers)
            dim = Encoder(model_dir, "cpu").dim
        schema = embedding_schema(dim)
        # the rows embedded in this run have files of their own: the index stage reads the night's new
        # vectors from these files alone (pipeline/index_update.py)
        fresh_files = sorted(files["fresh_file"])
        embedding_files = fresh_files + sorted(files["carried_file"])
        if not embedding_files:  # an empty table still gets one (empty) part file, so it has a schema
            embedding_files = [storage.write_part(stage, schema.empty_table(), [])]
        rejects_files = sorted(files["rejects_file"]) or [
            storage.write_part(stage, REJECTS_SCHEMA.empty_table(), [], prefix=f"{REJECTS_DIR}/part")]
        embedded, unchanged, rejected = totals["embedded"], totals["unchanged"], totals["rejected"]
        timings.update({k: totals[k] for k in ("preprocess_s", "encode_s", "write_s")})
        timings["pipeline_s"] = pipeline_s
        timings["wall_s"] = time.perf_counter() - wall_start
        manifest = {
            "kind": "embeddings",
            "catalog": catalog_uri,
            "column_map": columns.to_dict(),
            "model_dir": model_dir,
            "model_version": model_version,
            "dim": dim,
            "schema": str(schema),
            "rows_in": rows_in,
            "embedded": embedded,
            "unchanged_skipped": unchanged,
            "rejected": rejected,
            "rejects_by_reason": dict(sorted(reject_reasons.items())),
            "image_errors": dict(sorted(image_errors.items())),
            "modalities": dict(sorted(modalities.items())),
            "precision": dict(sorted(precision.items())),  # rows embedded in this run, by encode precision
            "files": embedding_files,
            "fresh_files": fresh_files,  # the files that hold every row embedded in this run (new and changed)
            "rejects": {"path": REJECTS_DIR, "files": [f[len(REJECTS_DIR) + 1:] for f in rejects_files],
                        "schema": str(REJECTS_SCHEMA)},
            "previous": options.previous,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "rows_per_s": round(rows_in / timings["wall_s"], 1) if timings["wall_s"] else None,
            "resources": {"batch_size": options.batch_size, "concurrency": options.concurrency,
                          "num_gpus": options.num_gpus, "encode_cpus": options.encode_cpus,
                          "encode_threads": options.encode_threads, "precision": options.precision},
            "created_at": created_at.isoformat(),
        }
        if rows_in != embedded + unchanged + rejected:
            raise RuntimeError(
                f"counts do not reconcile: rows_in {rows_in} != embedded {embedded} + unchanged {unchanged} + "
                f"rejected {rejected}; nothing was published"
            )
        manifest = storage.publish(stage, out_uri, manifest, overwrite=options.overwrite)
    log.info(summary_line(manifest))
    return manifest


def summary_line(manifest: Mapping[str, Any]) -> str:
    """One line for logs: throughput, counts and rejects by reason."""
    reasons = ", ".join(f"{k} {v}" for k, v in manifest["rejects_by_reason"].items()) or "none"
    errors = ", ".join(f"{k} {v}" for k, v in manifest["image_errors"].items()) or "none"
    return (
        f"embed: {manifest['rows_in']} rows in {manifest['timings']['wall_s']:.1f}s "
        f"({manifest['rows_per_s']} rows/s): embedded {manifest['embedded']}, "
        f"unchanged {manifest['unchanged_skipped']}, rejected {manifest['rejected']} ({reasons}); "
        f"image errors: {errors}"
    )
