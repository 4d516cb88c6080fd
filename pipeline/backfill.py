"""Category backfill: a similarity-weighted vote of labelled neighbours for rows whose category is null.

Output: a published directory of `OUT/part-<batch hash>-<token>.parquet` files (one per batch of the job) with
{item_id, predicted_category, confidence, n_neighbors} for every catalog row whose category was null and that has
an embedding; predicted_category is null where confidence < min_confidence (left unfilled and counted, not
guessed). The manifest is the job's report (counts, fill accuracy, leave-one-out curve).
"""

from __future__ import annotations

import time
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from pipeline import storage
from pipeline.catalog import NO_LABEL, ColumnMap, LabelIndex, check_label_columns, read_label_index
from pipeline.dedup import shard_stages, top_k

EVAL = "_eval"  # a query row of the leave-one-out sample (its own label hidden), not a row to fill
CURVE_THRESHOLDS = np.round(np.arange(0.0, 1.0001, 0.05), 2)

OUT_SCHEMA = pa.schema(
    [("item_id", pa.string()), ("predicted_category", pa.string()), ("confidence", pa.float32()), ("n_neighbors", pa.int32())]
)


def vote(neighbour_labels: np.ndarray, scores: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Similarity-weighted vote per row over labelled neighbours.

    `neighbour_labels` [Q, k] int (class code, -1 = unlabelled or no neighbour), `scores` [Q, k] (cosine).
    Weight = max(score, 0). Returns (winning code [Q], -1 when no labelled neighbour; confidence [Q] = winning
    weight / total weight; n_neighbors [Q] = labelled neighbours counted).
    """
    labelled = neighbour_labels >= 0
    if n_classes == 0:  # a catalog without a single label: nothing to vote for
        return np.full(len(scores), -1), np.zeros(len(scores)), np.zeros(len(scores), dtype=np.int64)
    weights = np.where(labelled, np.clip(np.nan_to_num(scores, nan=0.0), 0.0, None), 0.0)
    totals = np.zeros((len(scores), n_classes + 1))  # last column absorbs unlabelled slots
    rows = np.repeat(np.arange(len(scores)), scores.shape[1])
    np.add.at(totals, (rows, np.where(labelled, neighbour_labels, n_classes).ravel()), weights.ravel())
    totals = totals[:, :n_classes]
    winner = totals.argmax(axis=1)
    total = totals.sum(axis=1)
    confidence = np.divide(totals[np.arange(len(totals)), winner], total, out=np.zeros(len(total)), where=total > 0)
    n_neighbors = labelled.sum(axis=1)
    return np.where(n_neighbors > 0, winner, -1), confidence, n_neighbors


def predict(query_ids: np.ndarray, scores: np.ndarray, found: np.ndarray, codes: np.ndarray, classes: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-NN vote of each query over its labelled neighbours, the query itself excluded.

    `scores`, `found` [Q, k + 1]: the query's k + 1 nearest (cosine, item_id; None where missing), so that
    k are left once the query's own slot is dropped; `codes` [Q, k + 1]: the neighbours' class codes into
    `classes` (negative: no label). Returns (category [Q] object, None when no labelled neighbour;
    confidence [Q]; n_neighbors [Q]).
    """
    if not len(query_ids):
        return np.array([], dtype=object), np.array([]), np.array([], dtype=np.int64)
    is_self = found == np.asarray(query_ids, dtype=object)[:, None]
    # keep k neighbours: drop the self slot, or the last one when the query was not found
    keep = np.where(is_self.any(axis=1, keepdims=True), ~is_self, np.arange(k + 1) < k)
    winner, conf, n = vote(codes[keep].reshape(-1, k), scores[keep].reshape(-1, k), len(classes))
    return _names(np.asarray(classes, dtype=object), winner), conf, n


def precision_coverage(correct: np.ndarray, confidence: np.ndarray, thresholds: np.ndarray = CURVE_THRESHOLDS) -> list[dict]:
    """For each threshold: coverage (share of rows with confidence >= it) and precision among those rows."""
    curve = []
    for t in thresholds:
        covered = confidence >= t
        curve.append(
            {
                "threshold": float(t),
                "coverage": float(covered.mean()) if len(covered) else 0.0,
                "precision": float(correct[covered].mean()) if covered.any() else float("nan"),
            }
        )
    return curve


def plot_curve(curve: list[dict], dest: str | BinaryIO, title: str) -> None:
    """Precision and coverage against the confidence threshold, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [c["threshold"] for c in curve]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(t, [c["precision"] for c in curve], marker="o", label="precision")
    ax.plot(t, [c["coverage"] for c in curve], marker="s", label="coverage")
    ax.set_xlabel("min confidence")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest, dpi=100, format="png")
    plt.close(fig)


class BackfillQueries:
    """Callable for `map_batches`, the job's first stage: keeps the embedding table's rows that are queries:
    those whose category is null (to fill) and a seeded sample of up to `eval_sample` labelled rows (the
    leave-one-out evaluation, marked in `_eval`). Holds the catalog's LabelIndex (16 bytes a listing)."""

    def __init__(self, catalog_uri: str, columns: ColumnMap, eval_sample: int, seed: int):
        self.labels = read_label_index(catalog_uri, columns)
        labelled = np.flatnonzero(self.labels.labels[:, 0] >= 0)
        chosen = np.random.default_rng(seed).choice(len(labelled), min(eval_sample, len(labelled)), replace=False)
        self.sample = np.sort(labelled[chosen])  # rows of the LabelIndex

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch["item_id"].to_numpy(zero_copy_only=False).astype(object)
        found = self.labels.find(ids)
        fill = self.labels.lookup(ids, found)[:, 0] == NO_LABEL
        sample = (found[1] >= 0) & np.isin(found[1], self.sample)
        keep = fill | sample
        return batch.select(["item_id", "embedding"]).filter(pa.array(keep)).append_column(EVAL, pa.array(sample[keep]))


class BackfillVote:
    """Callable for `map_batches`, the job's last stage: each query's vote over its labelled neighbours
    (`_top_ids`, `_top_scores` from the shard stages, k + 1 of them); writes the batch's rows to fill as one
    part file of the output's `stage` (named by the batch's ids, so a retried batch rewrites its own file)
    and returns the batch's counts as one row. Holds the catalog's LabelIndex, neither the index nor the
    table."""

    def __init__(self, catalog_uri: str, columns: ColumnMap, stage: str, k: int, min_confidence: float):
        self.labels = read_label_index(catalog_uri, columns)
        self.stage, self.k, self.min_confidence = stage, k, min_confidence
        self.unlabelled = count_unlabelled(self.labels)  # the report's n_unlabelled, sent with every batch's counts

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch["item_id"].to_numpy(zero_copy_only=False).astype(object)
        is_eval = batch[EVAL].to_numpy(zero_copy_only=False).astype(bool)
        scores, found = top_k(batch)
        codes = self.labels.lookup(found.ravel())[:, 0].reshape(found.shape)
        classes = self.labels.classes
        pred, conf, n = predict(ids, scores, found, codes, classes, self.k)
        fill = ~is_eval
        filled = fill & (conf >= self.min_confidence)
        if fill.any():
            storage.write_part(self.stage, pa.table({
                "item_id": ids[fill], "predicted_category": np.where(filled, pred, None)[fill],
                "confidence": conf[fill].astype(np.float32), "n_neighbors": n[fill].astype(np.int32)}, schema=OUT_SCHEMA),
                ids[fill].tolist())
        own = self.labels.lookup(ids)  # [B, 1 or 2]: category, true_category
        counts = {"found": int(fill.sum()), "filled": int(filled.sum()), "fills_correct": -1, "unlabelled": self.unlabelled}
        if own.shape[1] == 2:  # the catalog has true_category
            counts["fills_correct"] = int((pred[filled] == _names(classes, own[filled, 1])).sum())
        correct, e_conf = pred[is_eval] == _names(classes, own[is_eval, 0]), conf[is_eval]
        covered = e_conf[None, :] >= CURVE_THRESHOLDS[:, None]  # [thresholds, eval rows]
        counts.update(eval=int(is_eval.sum()), eval_correct=int(correct.sum()), eval_covered=covered.sum(axis=1).tolist(),
                      eval_covered_correct=(covered & correct[None, :]).sum(axis=1).tolist())
        return pa.table({key: [value] for key, value in counts.items()})


def _names(classes: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """[n] object: the class of each code, None where the code is negative (no label)."""
    out = np.full(len(codes), None, dtype=object)
    out[codes >= 0] = classes[codes[codes >= 0]]
    return out


def run_backfill(index_uri: str, embeddings_uri: str, catalog_uri: str, out_uri: str, columns: ColumnMap | None = None,
                 k: int = 10, min_confidence: float = 0.5, eval_sample: int = 20_000, seed: int = 0,
                 overwrite: bool = False, plot: bool = False, num_actors: int = 1, threads_per_actor: int | None = None,
                 batch_size: int = 8192) -> dict:
    """The backfill job: predict the null categories of the catalog at `catalog_uri` by a k-NN vote over the
    index, publish them at `out_uri` with the report as manifest; returns the manifest.

    The report counts rows filled / unfilled (under `min_confidence` or no labelled neighbour) / without an
    embedding; with `true_category` in the catalog, the accuracy of the fills; and a leave-one-out
    evaluation on up to `eval_sample` labelled items (accuracy and the precision/coverage curve; with `plot`,
    `precision_coverage.png`). A Ray Data job over the embedding table, read once: BackfillQueries keeps the
    query rows, one stage per index shard finds their neighbours (dedup's ShardNeighbours: no process holds
    more than one shard), BackfillVote votes and writes the output's parts; the driver sums the counts. No
    process holds the table, the index or the output; the two label stages hold the catalog's labels as a
    LabelIndex (hashed ids and class codes, 12-16 bytes a listing). Fails
    before any work, naming the fix, when the output is already published, an input is not, or the catalog
    lacks its id or category column. Needs Ray initialised by the caller."""
    columns = columns or ColumnMap()
    storage.check_can_publish(out_uri, overwrite)
    n_shards = len(storage.read_manifest(index_uri)["shards"])
    storage.read_manifest(embeddings_uri)
    check_label_columns(catalog_uri, columns)
    fs, _ = storage.get_fs(embeddings_uri)
    with storage.staging(out_uri) as stage:
        ds = storage.read_dataset(storage.parquet_files(embeddings_uri), fs, ["item_id", "embedding"])
        pool = dict(batch_format="pyarrow", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=num_actors))
        # the actor stages share one Ray CPU (see dedup.shard_stages): the rest is the read tasks'
        ds = ds.map_batches(BackfillQueries, fn_constructor_args=(catalog_uri, columns, eval_sample, seed),
                            num_cpus=1 / (n_shards + 2), **pool)
        ds = shard_stages(ds, index_uri, k + 1, num_actors, threads_per_actor, batch_size,  # k + 1: it finds itself
                          cpus=n_shards / (n_shards + 2))
        ds = ds.map_batches(BackfillVote, fn_constructor_args=(catalog_uri, columns, stage, k, min_confidence),
                            num_cpus=1 / (n_shards + 2), **pool)
        counts = pd.DataFrame(ds.take_all())
        # the vote stage counts the catalog's unlabelled rows; with no batch to vote on, a task counts them
        n_unlabelled = (int(counts["unlabelled"].max()) if len(counts) else
                        ray.get(ray.remote(_count_unlabelled).remote(catalog_uri, columns)))
        report = _report(counts, n_unlabelled, k, min_confidence)
        if report["n_filled"] + report["n_unfilled"] == 0:  # no part written: an empty one keeps the schema
            storage.write_part(stage, OUT_SCHEMA.empty_table(), [])
        storage.forget_listings(stage)  # the actors wrote there: this process's client may have listed it before
        if plot and "leave_one_out" in report:
            png = storage.join(stage, "precision_coverage.png")
            with storage.get_fs(png)[0].open(storage.get_fs(png)[1], "wb") as f:
                plot_curve(report["leave_one_out"]["curve"], f, "category backfill, leave-one-out")
        manifest = {**report, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        return storage.publish(stage, out_uri, manifest, overwrite=overwrite)


def count_unlabelled(labels: LabelIndex) -> int:
    """Catalog rows (the embed stage's id rule) whose category is null."""
    return int((labels.labels[:, 0] == NO_LABEL).sum()) + sum(int(c[0] == NO_LABEL) for c in labels.exact.values())


def _count_unlabelled(catalog_uri: str, columns: ColumnMap) -> int:
    """`count_unlabelled` of the catalog, in a task (not the driver)."""
    return count_unlabelled(read_label_index(catalog_uri, columns))


def _report(counts: pd.DataFrame, n_unlabelled: int, k: int, min_confidence: float) -> dict:
    """The job's report from the vote stage's per-batch counts."""
    total = counts.drop(columns=["eval_covered", "eval_covered_correct", "unlabelled"]).sum() if len(counts) else pd.Series(dtype=int)
    found, filled = int(total.get("found", 0)), int(total.get("filled", 0))
    report = {"k": k, "min_confidence": min_confidence, "n_unlabelled": n_unlabelled, "n_filled": filled,
              "n_unfilled": found - filled, "n_no_embedding": n_unlabelled - found}
    if len(counts) and (counts["fills_correct"] >= 0).all():
        report["fill_accuracy"] = int(total["fills_correct"]) / filled if filled else None
    n_eval = int(total.get("eval", 0))
    if n_eval:
        covered = np.sum(counts["eval_covered"].tolist(), axis=0)
        correct = np.sum(counts["eval_covered_correct"].tolist(), axis=0)
        report["leave_one_out"] = {"n": n_eval, "accuracy": int(total["eval_correct"]) / n_eval, "curve": [
            {"threshold": float(t), "coverage": float(c / n_eval), "precision": float(r / c) if c else float("nan")}
            for t, c, r in zip(CURVE_THRESHOLDS, covered, correct)]}
    return report
