"""Duplicate-product search: all-items k-NN over the sharded index (Ray Data, one stage per shard), pairs above a
threshold, clusters.

Output: one published directory (pairs and clusters always come from the same run):

    OUT/duplicate_pairs/part-00000-<token>.parquet      {item_id, dup_item_id, score}, item_id < dup_item_id
    OUT/duplicate_clusters/part-00000-<token>.parquet   {item_id, cluster_id}: connected components of the pairs;
                                                cluster_id = the smallest item_id in the cluster
    OUT/_manifest.json                          threshold, k, counts, cluster-size histogram, timings
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline import storage
from pipeline.catalog import ColumnMap, read_labels
from pipeline.embedding_scan import merge_top_k
from pipeline.index import ShardedIndex

PAIRS_SCHEMA = pa.schema([("item_id", pa.string()), ("dup_item_id", pa.string()), ("score", pa.float32())])


TOP_IDS, TOP_SCORES = "_top_ids", "_top_scores"  # a batch's running top-k over the shards searched so far
COARSE_LISTS, COARSE_SCORES = "_coarse_lists", "_coarse_scores"  # its IVF lists, assigned once


SMALL_INDEX_BYTES = 64 * 2**20  # an index whose float vectors take less is searched by one stage


class ShardNeighbours:
    """Callable for `map_batches`: the all-pairs search's stage for some shards (`stage_shards`: one, unless
    the index is small), holding those shards only.

    `__call__({item_id [B], embedding [B, D], ...})` adds the shards' top-`k` to the batch's running top-k
    over the shards before it (`_top_ids`, `_top_scores`; absent at the first stage) and returns the batch.
    IVF shards share one trained quantizer: the first stage assigns each item's lists (`_coarse_*`) and the
    later ones search the same lists, as `ShardedIndex.search` does over all shards at once. An actor's memory
    is its shards' size: the index's over the shard count, where the index is not small.
    """

    def __init__(self, index_uri: str, shards: Sequence[int], k: int, threads: int | None = None):
        import faiss

        if threads:
            faiss.omp_set_num_threads(threads)
        m = storage.read_manifest(index_uri)
        self.index = ShardedIndex.open(index_uri, [m["shards"][s] for s in shards], m["dim"], m["spec"], m["search_params"])
        self.k = k

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = storage.embedding_matrix(batch["embedding"])
        if COARSE_LISTS in batch.column_names:
            coarse = (_matrix(batch[COARSE_LISTS]), _matrix(batch[COARSE_SCORES]))
        else:
            coarse = self.index.coarse_assignment(vectors)
            if coarse is not None:
                batch = batch.append_column(COARSE_LISTS, _lists(coarse[0])).append_column(COARSE_SCORES, _lists(coarse[1]))
        scores, ids = self.index.search(vectors, self.k, coarse)
        scores = np.where(np.isnan(scores), -np.inf, scores)  # a missing hit ranks last
        if TOP_IDS in batch.column_names:
            scores, ids = merge_top_k([(_matrix(batch[TOP_SCORES]), _matrix(batch[TOP_IDS])), (scores, ids)], self.k)
            batch = batch.drop_columns([TOP_IDS, TOP_SCORES])
        return batch.append_column(TOP_IDS, _lists(ids, pa.string())).append_column(TOP_SCORES, _lists(scores))


def stage_shards(manifest: dict) -> list[list[int]]:
    """The shards each search stage holds: one stage per shard, so that no process holds more than one, except
    for a small index (its float vectors under SMALL_INDEX_BYTES), which one stage holds whole: every stage is
    an actor process to start (1-3 s here), and a few thousand vectors do not repay a second one."""
    shards = list(range(len(manifest["shards"])))
    return [shards] if manifest["n_vectors"] * manifest["dim"] * 4 < SMALL_INDEX_BYTES else [[s] for s in shards]


def shard_stages(ds: ray.data.Dataset, index_uri: str, k: int, num_actors: int = 1, threads_per_actor: int | None = None,
                 batch_size: int = 8192, cpus: float = 1.0) -> ray.data.Dataset:
    """`ds` (item_id, embedding, ...) through one ShardNeighbours stage per group of `stage_shards`, a pool of
    `num_actors` actors each: every batch of `batch_size` rows leaves with its top-`k` over the whole index
    (`_top_ids`, `_top_scores`; read them with `top_k`). The stages of one pipeline share `cpus` Ray CPUs, even
    when FAISS runs more threads: reserving all cores for the actors would leave none for the read tasks that
    feed them, and the job would wait forever."""
    groups = stage_shards(storage.read_manifest(index_uri))
    for shards in groups:
        ds = ds.map_batches(ShardNeighbours, fn_constructor_args=(index_uri, shards, k, threads_per_actor),
                            batch_format="pyarrow", batch_size=batch_size,
                            compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=cpus / len(groups))
    return ds


def top_k(batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """A batch's top-k from `shard_stages`: (scores [B, k], -inf where missing; item ids [B, k] object, None
    where missing)."""
    return _matrix(batch[TOP_SCORES]), _matrix(batch[TOP_IDS])


def neighbour_pairs(batch: pa.Table, threshold: float) -> pa.Table:
    """(item_id, dup_item_id, score) for every neighbour in a batch's top-k (self excluded) scoring >=
    `threshold`, ordered so item_id < dup_item_id. A pair found from both sides appears twice here;
    `find_duplicate_pairs` keeps one."""
    ids = batch["item_id"].to_numpy(zero_copy_only=False).astype(object)
    scores, found = top_k(batch)
    query = np.repeat(ids, scores.shape[1]).reshape(scores.shape)
    keep = (scores >= threshold) & (found != query) & (found != None)  # noqa: E711 (elementwise)
    a, b = query[keep], found[keep]
    lo, hi = np.where(a < b, a, b), np.where(a < b, b, a)
    return pa.table({"item_id": lo.tolist(), "dup_item_id": hi.tolist(), "score": scores[keep]}, schema=PAIRS_SCHEMA)


def _lists(values: np.ndarray, type: pa.DataType | None = None) -> pa.FixedSizeListArray:
    """A [B, n] matrix as a column of B fixed-size lists."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), type), values.shape[1])


def _matrix(column: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    """A column of fixed-size lists as a [B, n] matrix (object for strings, None where null)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def find_duplicate_pairs(
    index_uri: str,
    embeddings_uri: str,
    k: int,
    threshold: float,
    num_actors: int = 1,
    threads_per_actor: int | None = None,
    batch_size: int = 8192,
) -> pd.DataFrame:
    """All pairs among the k nearest neighbours of every item scoring >= `threshold`, each unordered pair once.

    A Ray Data job over the embedding table; needs Ray initialised by the caller. The table is read once and
    each batch of `batch_size` items passes through one stage per index shard (`shard_stages`), then becomes
    pairs in a task: no process holds more than one shard.
    """
    storage.read_manifest(embeddings_uri)  # fail now, not in an actor, when the table is not published
    fs, _ = storage.get_fs(embeddings_uri)
    ds = storage.read_dataset(storage.parquet_files(embeddings_uri), fs, ["item_id", "embedding"])
    ds = shard_stages(ds, index_uri, k + 1, num_actors, threads_per_actor, batch_size)  # k + 1: the item finds itself
    pairs = ds.map_batches(neighbour_pairs, fn_args=(threshold,), batch_format="pyarrow")
    blocks = [t.cast(PAIRS_SCHEMA) for t in ray.get(pairs.to_arrow_refs())]
    frame = pa.concat_tables([PAIRS_SCHEMA.empty_table(), *blocks]).to_pandas()
    # the same pair found from both of its items: keep one (same score up to float noise: keep the higher)
    frame = frame.sort_values("score", ascending=False, kind="stable").drop_duplicates(["item_id", "dup_item_id"])
    return frame.sort_values(["item_id", "dup_item_id"]).reset_index(drop=True)


def cluster_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """Connected components of the pair graph (union-find): {item_id, cluster_id}, items in pairs only.

    cluster_id is the smallest item_id of the component, so it is stable across runs.
    """
    if pairs.empty:
        return pd.DataFrame({"item_id": pd.Series(dtype=str), "cluster_id": pd.Series(dtype=str)})
    codes, items = pd.factorize(pd.concat([pairs["item_id"], pairs["dup_item_id"]], ignore_index=True))
    parent = np.arange(len(items))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps the trees flat
            x = parent[x]
        return x

    n = len(pairs)
    for a, b in zip(codes[:n].tolist(), codes[n:].tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(x) for x in range(len(items))])
    frame = pd.DataFrame({"item_id": np.asarray(items, dtype=object), "root": roots})
    frame["cluster_id"] = frame.groupby("root")["item_id"].transform("min")
    return frame[["item_id", "cluster_id"]].sort_values(["cluster_id", "item_id"]).reset_index(drop=True)


def calibrate_threshold(pairs: pd.DataFrame, group_of: pd.Series, precision: float) -> dict[str, Any]:
    """The lowest threshold at which the pairs scoring at or above it reach `precision` on labelled groups.

    A pair is a true duplicate when both items have the same non-null group (`group_of`: item_id ->
    group_id; an item without a group has no known duplicate). Returns the calibration as the manifest
    records it: target_precision, reached (bool), threshold (None when no cut reaches the target: the only
    threshold that keeps the promise is then to publish no pairs), precision and pairs at that threshold,
    and best_precision / best_threshold, the most precise cut there is.
    """
    if pairs.empty:
        raise ValueError("no candidate pairs to calibrate on: raise --k or check the index")
    ga = pairs["item_id"].map(group_of).to_numpy(dtype=object)
    gb = pairs["dup_item_id"].map(group_of).to_numpy(dtype=object)
    same = np.array([a is not None and a == a and a == b for a, b in zip(ga, gb)])  # a == a: not NaN
    order = np.argsort(-pairs["score"].to_numpy(), kind="stable")
    scores, same = pairs["score"].to_numpy()[order], same[order]
    prec = np.cumsum(same) / np.arange(1, len(same) + 1)
    # a cut can only fall between different scores; keep the last position of each score run
    cuts = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
    best = cuts[np.argmax(prec[cuts])]
    calibration = {"target_precision": precision, "best_precision": float(prec[best]), "best_threshold": float(scores[best])}
    ok = cuts[prec[cuts] >= precision]
    if not len(ok):
        return {**calibration, "reached": False, "threshold": None, "precision": None, "pairs": 0}
    i = ok[-1]
    return {**calibration, "reached": True, "threshold": float(scores[i]), "precision": float(prec[i]), "pairs": int(i + 1)}


def check_cluster_share(clusters: pd.DataFrame, n_items: int, threshold: float, max_share: float) -> None:
    """Raise DedupSanityError when the largest cluster holds more than `max_share` of the `n_items` listings."""
    largest = int(clusters.groupby("cluster_id").size().max()) if len(clusters) else 0
    if n_items and largest > max_share * n_items:
        raise DedupSanityError(
            f"the largest duplicate cluster holds {largest} of {n_items} listings ({largest / n_items:.1%}) at "
            f"cosine >= {threshold:.4f}, over the {max_share:.0%} limit: the embeddings are near-collinear (an "
            "undertrained or collapsed model) or the threshold is far too low. Nothing was published. Check the "
            "model (docs/evaluation.md), raise the threshold, or raise max_cluster_share if such clusters are real.")


def cluster_quality(clusters: pd.DataFrame, group_of: pd.Series, item_ids: Iterable[str]) -> dict[str, float | int | None]:
    """Pairwise precision and recall of the clusters against labelled groups, over `item_ids` (the items
    that were embedded): precision = share of the pairs inside a cluster whose two items share a group;
    recall = share of the same-group pairs that fall inside one cluster. Items without a group are
    singletons in the truth. A ratio with nothing to count over is None."""
    items = pd.Index(pd.unique(np.asarray(list(item_ids), dtype=object)))
    group = group_of.reindex(items).to_numpy(dtype=object)
    cluster = clusters.set_index("item_id")["cluster_id"].reindex(items).to_numpy(dtype=object)
    cluster = np.where(pd.isna(cluster), items.to_numpy(dtype=object), cluster)  # unclustered = alone
    truth = np.where(pd.isna(group), "\0" + items.to_numpy(dtype=object), group)

    def pairs_within(*keys: np.ndarray) -> int:
        sizes = pd.DataFrame({str(i): k for i, k in enumerate(keys)}).value_counts().to_numpy()
        return int((sizes * (sizes - 1) // 2).sum())

    predicted, true, both = pairs_within(cluster), pairs_within(truth), pairs_within(cluster, truth)
    return {"pair_precision": both / predicted if predicted else None,
            "pair_recall": both / true if true else None, "predicted_pairs": predicted, "true_pairs": true}


def write_duplicates(out_uri: str, pairs: pd.DataFrame, clusters: pd.DataFrame, info: dict, overwrite: bool = False) -> dict:
    """Publish pairs and clusters as one directory (layout in the module docstring); returns the manifest."""
    storage.check_can_publish(out_uri, overwrite)
    sizes = Counter(clusters.groupby("cluster_id").size().tolist()) if len(clusters) else Counter()
    manifest = {
        **info,
        "n_pairs": len(pairs),
        "n_clusters": int(clusters["cluster_id"].nunique()) if len(clusters) else 0,
        "n_items_in_clusters": len(clusters),
        "cluster_size_histogram": {str(k): v for k, v in sorted(sizes.items())},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with storage.staging(out_uri) as stage:
        for name, frame, schema in (
            ("duplicate_pairs", pairs, PAIRS_SCHEMA),
            ("duplicate_clusters", clusters, pa.schema([("item_id", pa.string()), ("cluster_id", pa.string())])),
        ):
            fs, path = storage.get_fs(storage.join(stage, name, storage.part_name(stage, "part-00000.parquet")))
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with fs.open(path, "wb") as f:
                pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), f)
        manifest = storage.publish(stage, out_uri, manifest, overwrite=overwrite)
    return manifest


def read_groups(catalog_uri: str, columns: ColumnMap | None = None) -> pd.Series | None:
    """item_id -> group id (None where unknown) of a labelled catalog, for threshold calibration and
    cluster quality (pipeline.catalog.read_labels: the embed stage's id rule); None when the catalog has
    no group column."""
    frame = read_labels(catalog_uri, columns or ColumnMap())
    if "group_id" not in frame.columns:
        return None
    groups = frame.set_index("item_id")["group_id"]
    return groups.astype(object).where(groups.notna(), None)


class DedupSanityError(RuntimeError):
    """The duplicates look wrong (one cluster holds a large share of the catalog): nothing was published."""


def run_dedup(
    index_uri: str,
    embeddings_uri: str,
    out_uri: str,
    threshold: float | None,
    k: int = 10,
    calibrate: tuple[pd.Series, float] | None = None,
    num_actors: int = 1,
    threads_per_actor: int | None = None,
    overwrite: bool = False,
    max_cluster_share: float = 0.05,
) -> dict:
    """The dedup job: all-items k-NN, pairs at or above the threshold, clusters, published at `out_uri`.

    With `calibrate=(group_of, precision)` the threshold is the lowest that reaches `precision` on the
    labelled groups (item_id -> group_id), and the calibration is recorded in the manifest; where no
    threshold reaches it, the manifest's threshold is None and no pairs are published (a night's other
    stages go on; the calibration records the best precision there was).
    A sanity gate like the index's recall gate: when the largest cluster holds more than
    `max_cluster_share` of the embedded items (collapsed embeddings, or a threshold far too low), it
    raises DedupSanityError and publishes nothing. Needs Ray initialised by the caller.
    """
    if (threshold is None) == (calibrate is None):
        raise ValueError("give a threshold, or a calibration (labelled groups and a target precision), not both")
    storage.check_can_publish(out_uri, overwrite)
    start = time.perf_counter()
    # calibration needs every candidate pair, not only those above a threshold yet to be chosen
    pairs = find_duplicate_pairs(index_uri, embeddings_uri, k, -1.0 if calibrate else threshold,
                                 num_actors=num_actors, threads_per_actor=threads_per_actor)
    info: dict[str, Any] = {"index": index_uri, "embeddings": embeddings_uri, "k": k}
    if calibrate is not None:
        info["calibration"] = calibrate_threshold(pairs, *calibrate)
        # None: no cut reaches the precision; the job publishes no pairs (and says so) rather than failing
        threshold = info["calibration"]["threshold"]
    # with calibration every candidate pair is kept, so every embedded item is in one (k >= 1)
    embedded = pd.unique(pairs[["item_id", "dup_item_id"]].to_numpy().ravel()) if calibrate is not None else None
    pairs = (pairs[pairs["score"] >= threshold] if threshold is not None else pairs.iloc[:0]).reset_index(drop=True)
    clusters = cluster_pairs(pairs)
    if threshold is not None:
        check_cluster_share(clusters, storage.read_manifest(index_uri)["n_vectors"], threshold, max_cluster_share)
    if calibrate is not None:  # how the clusters match the labelled groups
        info["cluster_quality"] = cluster_quality(clusters, calibrate[0], embedded)
    info["search_s"] = round(time.perf_counter() - start, 3)
    return write_duplicates(out_uri, pairs, clusters, {**info, "threshold": threshold}, overwrite)
