"""Index quality: recall@k of a (sharded) index against exact search, and the tuning of its search
parameter to the cheapest value that reaches a required recall.
"""

from __future__ import annotations

import faiss
import numpy as np

from pipeline.index import RecallTooLowError, ShardByShard, ShardedIndex, ivf_or_none, search_param_name

RECALL_K = 10
TUNE_MARGIN = 0.01  # ~2 standard errors of the gap between recall@10 on 500 tuning and 1,000 eval queries
REFINE_K_FACTORS = (4, 16)  # re-rank k_factor * k fast-scan candidates exactly

# Search parameter candidates tried by `tune_search_param`, cheapest first.
NPROBE_GRID = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024)
EF_SEARCH_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def measure_recall(found_ids: np.ndarray, true_ids: np.ndarray, k: int = RECALL_K,
                   exclude: np.ndarray | None = None) -> float:
    """Recall@k: mean over queries of |found top-k ∩ exact top-k| / k.

    With `exclude` (the queries' own item ids, when the queries are vectors of the index), each query's
    own id is removed from both lists first: it is always found and would inflate recall by up to 1/k.
    Give k + 1 columns of each then, so that k real neighbours remain.
    """
    found, true = found_ids.tolist(), true_ids.tolist()
    if exclude is not None:
        found = [[i for i in row if i != own][:k] for row, own in zip(found, exclude.tolist())]
        true = [[i for i in row if i != own][:k] for row, own in zip(true, exclude.tolist())]
    hits = sum(len(set(f[:k]) & set(t[:k])) for f, t in zip(found, true))
    return hits / (k * len(true))


def tune_search_param(
    index: ShardedIndex | ShardByShard, queries: np.ndarray, true_ids: np.ndarray, min_recall: float, k: int = RECALL_K,
    exclude: np.ndarray | None = None,
) -> tuple[dict[str, int], list[dict]]:
    """The cheapest search parameter whose recall@k on `queries` reaches `min_recall`.

    Cost grows with nprobe / efSearch, so the first value in the grid that reaches the recall has the best
    batch throughput. The first value reaching min_recall + TUNE_MARGIN is preferred, so that the build's
    independent held-back measurement does not fall just under min_recall by sampling noise. Returns (params, trials [{<params>, recall, qps}]) and leaves `index` set to
    params. Raises RecallTooLowError when no value reaches `min_recall`.
    """
    name = search_param_name(index.shards[0].index)
    if name == "nprobe":
        nlist = ivf_or_none(index.shards[0].index).nlist
        grid = [{name: v} for v in NPROBE_GRID if v < nlist] + [{name: nlist}]
    elif name == "efSearch":
        grid = [{name: max(v, k)} for v in EF_SEARCH_GRID]
    else:
        grid = [{}]
    if isinstance(faiss.downcast_index(index.shards[0].index), faiss.IndexRefine):
        # more candidates to re-rank is the other knob; try the cheap end of both first
        grid = [{"k_factor": f, **g} for f in REFINE_K_FACTORS for g in grid]
    target = min(1.0, min_recall + TUNE_MARGIN)
    trials = []
    for params in grid:
        index.set_search_params(params)
        _, found = index.search(queries, k if exclude is None else k + 1)
        qps = len(queries) / max(index.search_s, 1e-9)  # FAISS's time, not the reading of shards
        recall = measure_recall(found, true_ids, k, exclude)
        trials.append({**params, "recall": round(recall, 4), "qps": round(qps, 1)})
        if recall >= target:
            return params, trials
    reached = [t for t in trials if t["recall"] >= min_recall]
    if reached:  # the margin is out of reach, the recall itself is not
        params = {name: v for name, v in reached[0].items() if name not in ("recall", "qps")}
        index.set_search_params(params)
        return params, trials
    best = max(trials, key=lambda t: t["recall"])
    best_params = ", ".join(f"{n}={v}" for n, v in best.items() if n not in ("recall", "qps")) or "exact"
    raise RecallTooLowError(
        f"the index reaches recall@{k} {best['recall']:.3f} at best ({best_params}), under the required "
        f"{min_recall}. Use a less compressed index (--index, or a larger --memory-budget), or lower --min-recall."
    )
