"""The build-index job: train once on a sample, fill the shards in parallel Ray tasks, tune, check recall, publish."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np
import ray

from pipeline import index as ix
from pipeline import index_tuning as tuning
from pipeline import storage

log = logging.getLogger(__name__)


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
def _fill_shard_task(trained: bytes, vectors: np.ndarray, item_ids: np.ndarray, out_uri: str, shard: int, threads: int) -> dict:
    return ix.fill_shard(trained, vectors, item_ids, out_uri, shard, threads)


def build_index(embeddings_uri: str, out_uri: str, config: IndexBuildConfig, overwrite: bool = False,
                reason: str = "asked for a full build") -> dict:
    """Build and publish the sharded index of a published embedding table; returns its manifest (`reason`:
    why it is built from scratch, recorded there; index_update.build_or_update decides).

    Needs Ray initialised by the caller. Raises RecallTooLowError (nothing published) when recall@10 on
    held-back queries stays under `config.min_recall`, ValueError on bad input (not normalised, too few
    vectors, budget too small), FileExistsError when `out_uri` is published and not `overwrite`.
    """
    storage.check_can_publish(out_uri, overwrite)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    ids, vectors, emb_manifest = ix.read_embedding_table(embeddings_uri)
    n, d = vectors.shape
    _check_input(ids, vectors, config)
    timings["read_s"] = time.perf_counter() - start
    log.info("read %d vectors of dim %d in %.1f s", n, d, timings["read_s"])

    rng = np.random.default_rng(config.seed)
    spec = ix.choose_index_spec(n, d, config.memory_budget_bytes) if config.spec == "auto" else config.spec
    # on a small table, split it between the two query sets rather than starve one of them
    n_eval = min(config.n_eval_queries, max(1, n // 2))
    n_tune = max(1, min(config.n_tune_queries, n - n_eval))
    held_back = rng.choice(n, size=min(n, n_eval + n_tune), replace=False)
    eval_rows, tune_rows = held_back[:n_eval], held_back[n_eval:]
    log.info("building %s over %d vectors of dim %d in %d shards", spec, n, d, config.n_shards)

    step = time.perf_counter()
    sample = vectors[np.sort(rng.choice(n, size=ix.train_sample_size(spec, n), replace=False))]
    trained = ix.train_empty_index(spec, sample, config.seed)
    del sample
    timings["train_s"] = time.perf_counter() - step
    log.info("trained %s in %.1f s", spec, timings["train_s"])

    with storage.staging(out_uri) as stage:
        step = time.perf_counter()
        shards = _fill_shards(trained, vectors, ids, stage, config.n_shards)
        timings["fill_s"] = time.perf_counter() - step
        log.info("filled %d shards in %.1f s", len(shards), timings["fill_s"])

        step = time.perf_counter()
        index = ix.ShardedIndex.open(stage, shards, d, spec, {})
        # the queries are vectors of the index: their own ids are left out of both lists (real neighbours only)
        k1 = tuning.RECALL_K + 1
        tune_truth = tuning.exact_neighbours(vectors[tune_rows], vectors, ids, k1)
        params, trials = tuning.tune_search_param(index, vectors[tune_rows], tune_truth, config.min_recall,
                                              exclude=ids[tune_rows])
        timings["tune_s"] = time.perf_counter() - step
        log.info("tuned %s in %.1f s: %s", params, timings["tune_s"], trials)

        eval_truth = tuning.exact_neighbours(vectors[eval_rows], vectors, ids, k1)
        _, found = index.search(vectors[eval_rows], k1)
        recall = tuning.measure_recall(found, eval_truth, exclude=ids[eval_rows])
        if recall < config.min_recall:
            raise ix.RecallTooLowError(
                f"recall@{tuning.RECALL_K} on {len(eval_rows)} held-back queries is {recall:.4f} with {params}, under "
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
            "n_queries": int(len(eval_rows)),
            "build_seconds": round(timings["total_s"], 2),
            "timings": {k: round(v, 2) for k, v in timings.items()},
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


def _check_input(ids: np.ndarray, vectors: np.ndarray, config: IndexBuildConfig) -> None:
    n = len(ids)
    if n < config.n_shards:
        raise ValueError(f"{n} vectors cannot fill {config.n_shards} shards: use fewer --shards")
    if len(set(ids.tolist())) != n:
        raise ValueError("the embedding table has duplicate item_ids: re-run the embed stage (ids must be unique)")
    norms = np.linalg.norm(vectors[: min(n, 10_000)], axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError(
            "embeddings are not L2-normalised (the contract requires it for inner-product search); "
            f"norms range {norms.min():.3f}-{norms.max():.3f}. Re-run the embed stage."
        )


def _fill_shards(trained: faiss.Index, vectors: np.ndarray, ids: np.ndarray, stage: str, n_shards: int) -> list[dict]:
    """Put the trained empty index in the object store once; one Ray task per shard adds its vectors."""
    trained_ref = ray.put(faiss.serialize_index(trained).tobytes())
    assignment = ix.shard_of(ids, n_shards)
    cpus = int(ray.available_resources().get("CPU", os.cpu_count() or 1))
    threads = max(1, cpus // n_shards)
    refs = []
    for s in range(n_shards):
        rows = np.flatnonzero(assignment == s)
        refs.append(_fill_shard_task.remote(trained_ref, vectors[rows], ids[rows], stage, s, threads))
    return ray.get(refs)
