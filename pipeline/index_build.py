"""The build-index job: train once on a sample, fill the shards in parallel Ray tasks, tune, check recall,
publish; the driver's memory does not grow with the table (every read of it is a task's or streamed)."""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline import index as ix
from pipeline import index_tuning as tuning
from pipeline import storage
from pipeline.catalog import id_hash
from pipeline.embedding_scan import batches, exact_top_k, file_rows, gather, merge_top_k, num_rows

log = logging.getLogger(__name__)

EXACT_TASK_ROWS = 250_000  # at least this many table rows (whole files) per task of the exact top-k that recall is measured against


@dataclass
class IndexBuildConfig:
    """What to build; saved in the index manifest."""

    n_shards: int = 4  # shards filled in parallel; item -> shard by a stable hash of its id
    spec: str = "auto"  # FAISS index_factory spec, or "auto" for `choose_index_spec`
    memory_budget_bytes: int = 8 * 2**30  # RAM the whole index (all shards) may take; drives "auto"
    min_recall: float = 0.95  # recall@10 vs exact search that the build must reach, or it publishes nothing
    n_eval_queries: int = 1000  # held-back queries for the recall written to the manifest
    n_tune_queries: int = 500  # other held-back queries, used to tune nprobe / efSearch
    seed: int = 0  # training sample, query sample and k-means are seeded: same seed, same index


@ray.remote(num_cpus=1)
def _train_task(embeddings_uri: str, spec: str, sample_rows: np.ndarray, query_rows: np.ndarray, seed: int,
                threads: int) -> dict:
    """Read the training sample and the held-back queries (by row number, one streamed pass), train the
    empty index on `threads` cores; the driver gets the trained index and the queries, never the table."""
    faiss.omp_set_num_threads(threads)  # a Ray task starts with one (OMP_NUM_THREADS=1)
    start = time.perf_counter()
    positions = np.unique(np.concatenate([sample_rows, query_rows]))
    rows = gather(embeddings_uri, positions)
    read_s = time.perf_counter() - start
    trained = ix.train_empty_index(spec, rows["embedding"][np.searchsorted(positions, sample_rows)], seed)
    where = np.searchsorted(positions, query_rows)
    return {"trained": faiss.serialize_index(trained).tobytes(), "query_ids": rows["item_id"][where],
            "queries": rows["embedding"][where], "read_s": read_s, "train_s": time.perf_counter() - start - read_s,
            "peak_rss_mib": _peak_rss_mib()}


@ray.remote(num_cpus=1)
def _top_k_task(embeddings_uri: str, queries: np.ndarray, k: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    return exact_top_k(embeddings_uri, queries, k, start, stop)


def exact_neighbours(embeddings_uri: str, queries: np.ndarray, k: int) -> np.ndarray:
    """Item ids [Q, k] of the exact inner-product top-k of `queries` over a table (see exact_top_k_tasks)."""
    return merge_top_k(ray.get(exact_top_k_tasks(embeddings_uri, queries, k)), k)[1]


def exact_top_k_tasks(embeddings_uri: str, queries: np.ndarray, k: int) -> list[ray.ObjectRef]:
    """Start the exact top-k of `queries` over a table: one Ray task per run of whole files holding at least
    EXACT_TASK_ROWS rows (the last run may hold fewer), each reading only its files; `merge_top_k` of their
    results, in order, gives the item ids. On one machine the scan is bound by the disk; on a cluster the
    tasks read in parallel."""
    queries_ref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))
    bounds, rows = [0], 0
    for n in file_rows(embeddings_uri):
        rows += n
        if rows - bounds[-1] >= EXACT_TASK_ROWS:
            bounds.append(rows)
    if rows > bounds[-1] or len(bounds) == 1:
        bounds.append(rows)
    return [_top_k_task.remote(embeddings_uri, queries_ref, k, lo, hi) for lo, hi in zip(bounds, bounds[1:])]


@ray.remote(num_cpus=1)
def _fill_shard_task(trained: bytes, embeddings_uri: str, start: int, stop: int, out_uri: str, shard: int, threads: int) -> dict:
    """Shard `shard` holds the table's rows start..stop-1: read them batch by batch and add them (this task
    reads only its own part of the table), checking every norm on the way."""
    ids, seen = [], 0

    def parts():
        nonlocal seen
        for batch in batches(embeddings_uri, ["item_id", "embedding"], start=start, stop=stop):
            vectors = storage.embedding_matrix(batch.column(1))
            _check_normalised(vectors, start + seen)
            ids.append(batch.column(0).cast(pa.string()))
            seen += len(batch)
            yield vectors

    entry = ix.fill_shard(trained, parts(), lambda: pa.chunked_array(ids, pa.string()), out_uri, shard, threads)
    return {**entry, "peak_rss_mib": _peak_rss_mib()}


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # ru_maxrss is KiB on Linux


def _check_normalised(vectors: np.ndarray, first_row: int) -> None:
    norms = np.linalg.norm(vectors, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > 1e-3)
    if len(bad):
        raise ValueError(
            "embeddings are not L2-normalised (the contract requires it for inner-product search): row "
            f"{first_row + bad[0]} has norm {norms[bad[0]]:.3f}. Re-run the embed stage."
        )


def build_index(embeddings_uri: str, out_uri: str, config: IndexBuildConfig, overwrite: bool = False,
                reason: str = "asked for a full build") -> dict:
    """Build and publish the sharded index of a published embedding table; returns its manifest (`reason`:
    why it is built from scratch, recorded there; index_update.build_or_update decides).

    The driver holds neither the table nor the index: a Ray task reads the training sample and the
    held-back queries and trains the empty index; one Ray task per shard reads its own range of rows and
    fills its shard; the exact neighbours of the queries are streamed over the table; a task loads the
    shards to tune the search parameter and measure recall. Needs Ray initialised by the
    caller. Raises RecallTooLowError (nothing published) when recall@10 on held-back queries stays under
    `config.min_recall`, ValueError on bad input (not normalised, duplicate ids, too few vectors, budget
    too small), FileExistsError when `out_uri` is published and not `overwrite`.
    """
    storage.check_can_publish(out_uri, overwrite)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    emb_manifest = storage.read_manifest(embeddings_uri)
    n, d = num_rows(embeddings_uri), int(emb_manifest["dim"])
    if n < config.n_shards:
        raise ValueError(f"{n} vectors cannot fill {config.n_shards} shards: use fewer --shards")

    rng = np.random.default_rng(config.seed)
    spec = ix.choose_index_spec(n, d, config.memory_budget_bytes) if config.spec == "auto" else config.spec
    # on a small table, split it between the two query sets rather than starve one of them
    n_eval = min(config.n_eval_queries, max(1, n // 2))
    n_tune = max(1, min(config.n_tune_queries, n - n_eval))
    held_back = rng.choice(n, size=min(n, n_eval + n_tune), replace=False)
    sample = np.sort(rng.choice(n, size=ix.train_sample_size(spec, n), replace=False))
    log.info("building %s over %d vectors of dim %d in %d shards", spec, n, d, config.n_shards)

    threads = int(ray.available_resources().get("CPU", os.cpu_count() or 1))  # train and tune run alone
    trained = ray.get(_train_task.remote(embeddings_uri, spec, sample, held_back, config.seed, threads))
    timings["read_s"], timings["train_s"] = trained["read_s"], trained["train_s"]
    log.info("trained %s in %.1f s (sample read in %.1f s)", spec, trained["train_s"], trained["read_s"])
    queries, query_ids = trained["queries"], trained["query_ids"]

    with storage.staging(out_uri) as stage:
        step = time.perf_counter()
        shards = _fill_shards(trained["trained"], embeddings_uri, n, stage, config.n_shards)
        timings["fill_s"] = time.perf_counter() - step
        log.info("filled %d shards in %.1f s", len(shards), timings["fill_s"])
        peaks = {"train": trained["peak_rss_mib"], "fill": max(s.pop("peak_rss_mib") for s in shards)}

        step = time.perf_counter()
        # the queries are vectors of the index: their own ids are left out of both lists (real neighbours only)
        truth = exact_neighbours(embeddings_uri, queries, tuning.RECALL_K + 1)
        params, trials, recall, peaks["tune"] = ray.get(_tune_task.remote(
            stage, shards, d, spec, queries, query_ids, truth, n_eval, config.min_recall, threads))
        timings["tune_s"] = time.perf_counter() - step
        log.info("tuned %s in %.1f s: %s", params, timings["tune_s"], trials)
        if recall < config.min_recall:
            raise ix.RecallTooLowError(
                f"recall@{tuning.RECALL_K} on {n_eval} held-back queries is {recall:.4f} with {params}, under "
                f"the required {config.min_recall} (tuning queries reached it: try more --tune-queries, a less "
                "compressed index, or a lower --min-recall). Nothing was published."
            )
        timings["total_s"] = time.perf_counter() - start
        manifest = {
            "model_version": emb_manifest.get("model_version"),
            "model_dir": emb_manifest.get("model_dir"),
            "embeddings": embeddings_uri,
            "dim": d,
            "metric": ix.METRIC,
            "spec": spec,
            "n_vectors": n,
            "shards": shards,
            "search_params": params,
            "tuning": trials,
            f"recall_at_{tuning.RECALL_K}": round(recall, 4),  # real neighbours: each query's own id left out
            "n_queries": int(n_eval),
            "build_seconds": round(timings["total_s"], 2),
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "task_peak_rss_mib": peaks,
            "config": asdict(config),
            "seed": config.seed,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "mode": "build",
            "reason": reason,
            "changed_since_build": 0,
        }
        manifest["base_build"] = {"built_at": manifest["built_at"], "n_vectors": n}
        manifest = storage.publish(stage, out_uri, manifest, overwrite=overwrite)
    return manifest


@ray.remote(num_cpus=1)
def _tune_task(stage: str, shards: list[dict], d: int, spec: str, queries: np.ndarray, query_ids: np.ndarray,
               truth: np.ndarray, n_eval: int, min_recall: float, threads: int) -> tuple[dict, list[dict], float, float]:
    """In a worker (the driver never holds the index), one shard in memory at a time (`ShardByShard`): check
    the ids are unique, tune the search parameter on the queries after the first `n_eval` and measure
    recall@10 on those."""
    faiss.omp_set_num_threads(threads)
    _check_unique(stage, shards)
    index = ix.ShardByShard(stage, shards, d, spec)
    tune, evaluate = slice(n_eval, None), slice(0, n_eval)
    params, trials = tuning.tune_search_param(index, queries[tune], truth[tune], min_recall, exclude=query_ids[tune])
    _, found = index.search(queries[evaluate], tuning.RECALL_K + 1)
    recall = tuning.measure_recall(found, truth[evaluate], exclude=query_ids[evaluate])
    return params, trials, recall, _peak_rss_mib()


def _check_unique(stage: str, shards: list[dict]) -> None:
    """Item ids must be unique across the shards (the embed stage rejects duplicate ids; a table written
    by other means might not). Reads one shard's id map at a time and keeps its ids as 64-bit hashes; only
    ids whose hash repeats are compared as strings."""
    def shard_ids():
        for entry in shards:
            fs, path = storage.get_fs(storage.join(stage, entry["ids"]))
            with fs.open(path, "rb") as f:
                yield pq.read_table(f, columns=["item_id"]).column("item_id")

    values, counts = np.unique(np.concatenate([id_hash(ids) for ids in shard_ids()]), return_counts=True)
    repeated = values[counts > 1]
    if len(repeated):
        ids = [i for column in shard_ids() for i in pc.filter(column, np.isin(id_hash(column), repeated)).to_pylist()]
        if len(set(ids)) != len(ids):
            raise ValueError("the embedding table has duplicate item_ids: re-run the embed stage (ids must be unique)")


def _fill_shards(trained: bytes, embeddings_uri: str, n: int, stage: str, n_shards: int) -> list[dict]:
    """Put the trained empty index in the object store once; one Ray task per shard reads its own range of
    rows (about n / n_shards, in storage order) and adds them."""
    trained_ref = ray.put(trained)
    cpus = int(ray.available_resources().get("CPU", os.cpu_count() or 1))
    threads = max(1, cpus // n_shards)
    bounds = np.linspace(0, n, n_shards + 1).astype(np.int64)
    return ray.get([_fill_shard_task.remote(trained_ref, embeddings_uri, int(bounds[s]), int(bounds[s + 1]), stage, s, threads)
                    for s in range(n_shards)])
