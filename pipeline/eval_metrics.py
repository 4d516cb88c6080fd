"""Evaluation metrics (EVALUATION.md) over embeddings: duplicate search, category prediction (k-NN vote,
linear probe), modality movement. Exact FAISS inner-product search; scikit-learn's macro-F1.
Definitions are in pipeline/evaluate.py's docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import torch
from sklearn.metrics import f1_score

from pipeline.backfill import precision_coverage as backfill_curve
from pipeline.backfill import vote

MAX_K = 10  # recall@k curves run k = 1..MAX_K


# ---------------------------------------------------------------------------------------------
# search


def _search(
    gallery: np.ndarray, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, gallery row ids), both [Q, k], by inner product; id -1 (score 0) where there is none.

    `exclude[q]` (a gallery row, e.g. the query itself) is never returned. Zero queries get no
    results: a tie over the whole gallery would otherwise rank rows by storage order.
    """
    scores = np.zeros((len(queries), k), dtype=np.float32)
    out = np.full((len(queries), k), -1, dtype=np.int64)
    live = np.flatnonzero(np.abs(queries).sum(axis=1) > 0)
    if len(live) == 0 or len(gallery) == 0:
        return scores, out
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    extra = 0 if exclude is None else 1
    found, ids = index.search(np.ascontiguousarray(queries[live], dtype=np.float32), min(k + extra, len(gallery)))
    if exclude is not None:
        # identical vectors tie with the query's own row, so self is not always at rank 0: move it last by id
        ids = np.where(ids == exclude[live][:, None], -1, ids)
        order = np.argsort(ids < 0, axis=1, kind="stable")
        ids, found = np.take_along_axis(ids, order, axis=1), np.take_along_axis(found, order, axis=1)
    n = min(k, ids.shape[1])
    out[live, :n] = ids[:, :n]
    scores[live, :n] = np.where(ids[:, :n] >= 0, found[:, :n], 0.0)
    return scores, out


def _retrieval_metrics(hits: np.ndarray, n_relevant: np.ndarray) -> dict[str, float | list[float]]:
    """hits [Q, MAX_K] bool, n_relevant [Q] -> recall@1, recall@10, map@10, recall curve k=1..MAX_K."""
    if len(hits) == 0:
        nan = float("nan")
        return {"recall@1": nan, "recall@10": nan, "map@10": nan, "n_queries": 0, "recall_curve": [nan] * MAX_K}
    curve = np.logical_or.accumulate(hits, axis=1).mean(axis=0)  # [MAX_K]
    ranks = np.arange(1, hits.shape[1] + 1)
    precision_at = np.cumsum(hits, axis=1) / ranks  # [Q, MAX_K]
    ap = (precision_at * hits).sum(axis=1) / np.minimum(n_relevant, hits.shape[1])
    return {
        "recall@1": float(curve[0]), "recall@10": float(curve[-1]), "map@10": float(ap.mean()),
        "n_queries": int(len(hits)), "recall_curve": [float(v) for v in curve],
    }


def group_codes(group_ids: Sequence[object]) -> np.ndarray:
    """Group ids -> int codes; None/NaN (no group) -> a code of its own per row."""
    codes: dict[object, int] = {}
    out = np.empty(len(group_ids), dtype=np.int64)
    for i, g in enumerate(group_ids):
        if g is None or (isinstance(g, float) and np.isnan(g)):
            out[i] = -1 - i  # singletons never match anything
        else:
            out[i] = codes.setdefault(g, len(codes))
    return out


def esp_natural(
    emb: np.ndarray, group_ids: Sequence[object], query_emb: np.ndarray | None = None
) -> dict[str, float | list[float]]:
    """Natural-duplicate search: every row of a group with >= 2 members queries the rest of the catalog.

    `emb` [N, D] is the gallery; `query_emb` (default `emb`) gives the queries' vectors, e.g. from
    blanked inputs; row i's own gallery entry is never a result. Hits are the other members of the
    query's group; None/NaN group ids are singletons. Returns recall@1, recall@10, map@10, n_queries
    and recall_curve (k = 1..10).
    """
    codes = group_codes(group_ids)
    _, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    size = counts[inverse]
    queries = np.flatnonzero(size >= 2)
    q_emb = emb if query_emb is None else query_emb
    _, ids = _search(emb, q_emb[queries], MAX_K, exclude=queries)
    hits = (ids >= 0) & (codes[np.maximum(ids, 0)] == codes[queries][:, None])
    return _retrieval_metrics(hits, size[queries] - 1)


def esp_relisting(
    catalog_emb: np.ndarray,
    relist_emb: np.ndarray,
    original_index: np.ndarray,
    group_ids: Sequence[object] | None = None,
) -> dict[str, float | list[float]]:
    """Re-listing search: query = a re-listing, gallery = the catalog, hit = the listing it was made from.

    With `group_ids`, any catalog row of the original's group is a hit too (it is the same product,
    e.g. a byte-identical photo listed twice). Returns recall@1, recall@10, map@10, n_queries, recall_curve.
    """
    original_index = np.asarray(original_index, dtype=np.int64)
    _, ids = _search(catalog_emb, relist_emb, MAX_K)
    found = np.maximum(ids, 0)
    hits = (ids >= 0) & (found == original_index[:, None])
    n_relevant = np.ones(len(original_index), dtype=np.int64)
    if group_ids is not None:
        codes = group_codes(group_ids)
        hits |= (ids >= 0) & (codes[found] == codes[original_index][:, None])
        _, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
        n_relevant = counts[inverse][original_index]
    return _retrieval_metrics(hits, n_relevant)


# ---------------------------------------------------------------------------------------------
# category prediction


def macro_f1(true: Sequence[str], predicted: Sequence[str | None]) -> float:
    """Unweighted mean F1 over every class that is true or predicted somewhere (scikit-learn's); a None
    prediction (no answer) is a miss for the true class and adds no class."""
    classes = sorted({c for c in [*true, *predicted] if c is not None})
    if not classes:
        return float("nan")
    missing = "\x00no answer"  # outside every label set: sklearn compares labels, not None
    answered = [missing if p is None else p for p in predicted]
    return float(f1_score(list(true), answered, labels=classes, average="macro", zero_division=0))


def knn_vote_loo(
    emb: np.ndarray,
    labels: Sequence[str | None],
    k: int = 10,
    query_emb: np.ndarray | None = None,
    max_queries: int | None = None,
    seed: int = 0,
) -> dict:
    """Leave-one-out, cosine-weighted k-NN vote of the category over the labelled rows.

    Each labelled row (or a seeded sample of `max_queries` of them) is predicted from its k nearest
    other labelled rows, weighted by max(cosine, 0); confidence = the winner's weight share.
    `query_emb` replaces the queries' vectors (blanked runs). Rows with label None are neither
    queries nor neighbours. Returns accuracy, macro_f1, n_queries, and per query `confidence` and
    `correct` lists (for the precision/coverage curve).
    """
    labelled = np.array([i for i, y in enumerate(labels) if y is not None], dtype=np.int64)
    y = np.array([labels[i] for i in labelled], dtype=object)
    queries = np.arange(len(labelled))
    if max_queries is not None and max_queries < len(queries):
        queries = np.sort(np.random.default_rng(seed).choice(len(queries), max_queries, replace=False))
    gallery = emb[labelled]
    q_emb = (emb if query_emb is None else query_emb)[labelled[queries]]
    scores, ids = _search(gallery, q_emb, k, exclude=queries)
    classes, codes = np.unique(y.astype(str), return_inverse=True)
    neighbour_codes = np.where(ids >= 0, codes[np.clip(ids, 0, None)], -1)
    winner, confidence, _ = vote(neighbour_codes, scores, len(classes))  # the backfill job's own vote
    predicted = [classes[w] if w >= 0 else None for w in winner]
    truth = y[queries]
    correct = [p == t for p, t in zip(predicted, truth)]
    return {
        "accuracy": float(np.mean(correct)) if correct else float("nan"),
        "macro_f1": macro_f1(list(truth), predicted),
        "n_queries": int(len(queries)),
        "confidence": confidence,
        "correct": correct,
    }


def precision_coverage(
    confidence: Sequence[float], correct: Sequence[bool], thresholds: Sequence[float]
) -> dict[str, list[float]]:
    """Backfill trade-off: at each threshold, share of rows filled (coverage) and share filled right."""
    curve = backfill_curve(np.asarray(correct, dtype=bool), np.asarray(confidence, dtype=float), np.asarray(thresholds))
    return {key: [point[key] for point in curve] for key in ("threshold", "coverage", "precision")}


def linear_probe(
    emb: np.ndarray,
    labels: Sequence[str | None],
    seed: int = 0,
    test_fraction: float = 0.2,
    l2: float = 1e-4,
    max_iter: int = 100,
    max_train: int | None = 10_000,
    query_embs: dict[str, np.ndarray] | None = None,
) -> dict:
    """Multinomial logistic regression on frozen embeddings, scored on a held-out split (torch L-BFGS with a
    strong-Wolfe line search: scikit-learn's LogisticRegression reaches the same accuracy and macro-F1 on the
    same objective 1.8x slower, docs/architecture.md).

    Labelled rows are split by a seeded permutation; at most `max_train` of the training split are
    used (the cost grows with rows x D x classes per L-BFGS step); features are standardised with the training
    split's statistics; full-batch L-BFGS on mean cross-entropy + l2/2 * |W|^2 from zero weights, so
    the result is deterministic. A test class never seen in training, or a zero query vector (no
    answer), counts as an error.
    Returns accuracy, macro_f1, n_train, n_test; and with `query_embs` (name -> [N, D], e.g. blanked
    inputs) also `queries`: name -> {accuracy, macro_f1} of the same probe scored on those vectors.
    """
    labelled = np.array([i for i, y in enumerate(labels) if y is not None], dtype=np.int64)
    order = labelled[np.random.default_rng(seed).permutation(len(labelled))]
    n_test = int(round(test_fraction * len(order)))
    test, train = order[:n_test], order[n_test:][:max_train]
    classes = sorted({labels[i] for i in train})
    index = {c: j for j, c in enumerate(classes)}
    x = torch.from_numpy(np.asarray(emb[train], dtype=np.float32))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    target = torch.tensor([index[labels[i]] for i in train])
    weight = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, target) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    truth = [labels[i] for i in test]

    def score(source: np.ndarray) -> dict[str, float | None]:
        rows = np.asarray(source[test], dtype=np.float32)
        with torch.no_grad():
            best = (((torch.from_numpy(rows) - mean) / std) @ weight + bias).argmax(1).tolist()
        # a zero vector is "no answer" here as in search, not the class prior
        predicted = [classes[j] if rows[r].any() else None for r, j in enumerate(best)]
        accuracy = float(np.mean([p == t for p, t in zip(predicted, truth)])) if truth else float("nan")
        return {"accuracy": accuracy, "macro_f1": macro_f1(truth, predicted)}

    result: dict = {**score(emb), "n_train": int(len(train)), "n_test": int(len(test))}
    if query_embs:
        result["queries"] = {name: score(q) for name, q in query_embs.items()}
    return result


def modality_movement(full: np.ndarray, title_blank: np.ndarray, image_blank: np.ndarray, both: np.ndarray) -> dict:
    """How far blanking each modality moves the embedding (module docstring).

    Averaged over rows marked in `both` [N] bool (a title and image bytes present) whose full
    embedding is non-zero (an embedder that could not read the row has nothing to move).
    """
    both = both & full.any(axis=1)
    if not both.any():
        return {"title_movement": float("nan"), "image_movement": float("nan"), "image_share": float("nan")}
    title = 1.0 - float(np.mean(np.sum(full[both] * title_blank[both], axis=1)))
    image = 1.0 - float(np.mean(np.sum(full[both] * image_blank[both], axis=1)))
    share = image / (title + image) if title + image > 0 else float("nan")
    return {"title_movement": title, "image_movement": image, "image_share": share}
