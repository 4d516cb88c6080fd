"""Category backfill: a similarity-weighted vote of labelled neighbours for rows whose category is null.

Output: a published directory `OUT/part-00000-<token>.parquet` with {item_id, predicted_category, confidence,
n_neighbors} for every catalog row whose category was null and that has an embedding;
predicted_category is null where confidence < min_confidence (left unfilled and counted, not guessed).
"""

from __future__ import annotations

import os
import time
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline import storage
from pipeline.catalog import ColumnMap, check_label_columns, read_labels
from pipeline.embedding_scan import read_vectors
from pipeline.index import ShardedIndex

SEARCH_BATCH = 8192  # queries per FAISS call: large enough for BLAS, small enough to bound memory
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


def predict(
    index: ShardedIndex, query_ids: np.ndarray, vectors: np.ndarray, labels: pd.Series, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-NN vote for each query over its labelled neighbours, the query itself excluded.

    `labels`: item_id -> category (null = unlabelled). Returns (category [Q] object, None when no labelled
    neighbour; confidence [Q]; n_neighbors [Q]).
    """
    known = labels.dropna()
    known = known[~known.index.duplicated()]
    codes, classes = pd.factorize(known)
    code_of = pd.Series(codes, index=known.index)
    preds, confs, counts = [], [], []
    for start in range(0, len(vectors), SEARCH_BATCH):
        scores, found = index.search(vectors[start : start + SEARCH_BATCH], k + 1)  # +1: the query finds itself
        ids = query_ids[start : start + SEARCH_BATCH]
        is_self = found == np.asarray(ids, dtype=object)[:, None]
        neighbour_codes = code_of.reindex(found.ravel()).fillna(-1).to_numpy(dtype=np.int64).reshape(found.shape)
        # keep k neighbours: drop the self slot, or the last one when the query was not found
        keep = np.where(is_self.any(axis=1, keepdims=True), ~is_self, np.arange(k + 1) < k)
        winner, conf, n = vote(neighbour_codes[keep].reshape(-1, k), scores[keep].reshape(-1, k), len(classes))
        preds.append(np.where(winner >= 0, np.asarray(classes, dtype=object)[np.maximum(winner, 0)], None))
        confs.append(conf)
        counts.append(n)
    if not preds:
        return np.array([], dtype=object), np.array([]), np.array([], dtype=np.int64)
    return np.concatenate(preds), np.concatenate(confs), np.concatenate(counts)


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


def leave_one_out_eval(index: ShardedIndex, ids: np.ndarray, vectors: np.ndarray, labels: pd.Series, k: int) -> dict:
    """Hide each labelled item's own label (it is excluded from its neighbours) and predict it.

    Returns {n, accuracy (every row, abstaining counts as wrong), curve [{threshold, coverage, precision}]}.
    """
    known = labels.reindex(ids)
    rows = np.flatnonzero(known.notna().to_numpy())
    pred, conf, _ = predict(index, ids[rows], vectors[rows], labels, k)
    correct = pred == known.to_numpy(dtype=object)[rows]
    return {"n": int(len(rows)), "accuracy": float(correct.mean()) if len(rows) else float("nan"),
            "curve": precision_coverage(correct, conf)}


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


def backfill_categories(
    index_uri: str,
    embeddings_uri: str,
    catalog: pd.DataFrame,
    k: int = 10,
    min_confidence: float = 0.5,
    eval_sample: int = 20_000,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """Predicted categories for the catalog rows with a null category; returns (rows, report).

    The report counts rows filled / unfilled (under `min_confidence` or no labelled neighbour) / without an
    embedding; with `true_category` in the catalog, the accuracy of the fills; and a leave-one-out
    evaluation on up to `eval_sample` labelled items (accuracy and the precision/coverage curve).
    """
    index = ShardedIndex.load(index_uri)
    labels = pd.Series(catalog["category"].to_numpy(dtype=object), index=catalog["item_id"])
    unknown = catalog.loc[catalog["category"].isna(), "item_id"].to_numpy(dtype=object)
    dim = storage.read_manifest(embeddings_uri)["dim"]
    ids, vectors = read_vectors(embeddings_uri, unknown, dim)  # streamed: only these rows are held
    pred, conf, n = predict(index, ids, vectors, labels, k)
    filled = conf >= min_confidence
    rows = pd.DataFrame(
        {"item_id": ids, "predicted_category": np.where(filled, pred, None), "confidence": conf.astype(np.float32),
         "n_neighbors": n.astype(np.int32)}
    )
    report = {
        "k": k,
        "min_confidence": min_confidence,
        "n_unlabelled": int(len(unknown)),
        "n_filled": int(rows["predicted_category"].notna().sum()),
        "n_unfilled": int(rows["predicted_category"].isna().sum()),
        "n_no_embedding": int(len(unknown) - len(ids)),
    }
    if "true_category" in catalog.columns:
        truth = pd.Series(catalog["true_category"].to_numpy(dtype=object), index=catalog["item_id"]).reindex(ids).to_numpy(dtype=object)
        got = rows["predicted_category"].notna().to_numpy()
        report["fill_accuracy"] = float((rows["predicted_category"].to_numpy(dtype=object)[got] == truth[got]).mean()) if got.any() else None
    labelled = catalog.loc[catalog["category"].notna(), "item_id"].to_numpy(dtype=object)
    if eval_sample > 0 and len(labelled):
        sample = np.random.default_rng(seed).permutation(labelled)[:eval_sample]
        s_ids, s_vectors = read_vectors(embeddings_uri, sample, dim)
        report["leave_one_out"] = leave_one_out_eval(index, s_ids, s_vectors, labels, k)
    return rows, report


def run_backfill(index_uri: str, embeddings_uri: str, catalog_uri: str, out_uri: str, columns: ColumnMap | None = None,
                 k: int = 10, min_confidence: float = 0.5, eval_sample: int = 20_000, seed: int = 0,
                 overwrite: bool = False, plot: bool = False) -> dict:
    """The backfill job: predict the null categories of the catalog at `catalog_uri` from the index and the
    embedding table, publish them at `out_uri` (write_backfill); returns the manifest.

    What grows with the catalog (its labels, the whole index, the unlabelled rows and their votes) is held
    by one Ray task, not by the driver: on a cluster that task runs on a worker node with the memory for
    the index, as a dedup actor does. Fails before the task starts, naming the fix, when the output is
    already published, an input is not, or the catalog lacks its id or category column. Needs Ray
    initialised by the caller."""
    columns = columns or ColumnMap()
    storage.check_can_publish(out_uri, overwrite)
    storage.read_manifest(index_uri)
    storage.read_manifest(embeddings_uri)
    check_label_columns(catalog_uri, columns)
    threads = max(1, int(ray.available_resources().get("CPU", os.cpu_count() or 1)))  # FAISS's threads in the task
    task = ray.remote(_backfill_task).options(num_cpus=1)
    try:
        manifest = ray.get(task.remote(index_uri, embeddings_uri, catalog_uri, out_uri, columns, k, min_confidence,
                                       eval_sample, seed, overwrite, plot, threads))
    except ray.exceptions.RayTaskError as e:  # the task's own error, not Ray's wrapper and remote traceback
        raise e.cause from None
    storage.forget_listings(out_uri)  # the task published it: this process's client listed it before
    return manifest


def _backfill_task(index_uri: str, embeddings_uri: str, catalog_uri: str, out_uri: str, columns: ColumnMap, k: int,
                   min_confidence: float, eval_sample: int, seed: int, overwrite: bool, plot: bool, threads: int) -> dict:
    import faiss

    faiss.omp_set_num_threads(threads)
    rows, report = backfill_categories(index_uri, embeddings_uri, read_labels(catalog_uri, columns), k,
                                       min_confidence, eval_sample, seed)
    return write_backfill(out_uri, rows, report, overwrite=overwrite, plot=plot)


def write_backfill(out_uri: str, rows: pd.DataFrame, report: dict, overwrite: bool = False, plot: bool = False) -> dict:
    """Publish the backfill rows with the report as manifest; with `plot`, also `precision_coverage.png`."""
    storage.check_can_publish(out_uri, overwrite)
    manifest = {**report, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with storage.staging(out_uri) as stage:
        fs, path = storage.get_fs(storage.join(stage, storage.part_name(stage, "part-00000.parquet")))
        with fs.open(path, "wb") as f:
            pq.write_table(pa.Table.from_pandas(rows, schema=OUT_SCHEMA, preserve_index=False), f)
        if plot and "leave_one_out" in report:
            png = storage.join(stage, "precision_coverage.png")
            with storage.get_fs(png)[0].open(storage.get_fs(png)[1], "wb") as f:
                plot_curve(report["leave_one_out"]["curve"], f, "category backfill, leave-one-out")
        manifest = storage.publish(stage, out_uri, manifest, overwrite=overwrite)
    return manifest
