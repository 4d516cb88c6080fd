"""Sharded FAISS index: index choice, training, shard files, loading and merged top-k search (no Ray).

Index dir layout (a published directory, see `storage`):

    shard-00000-<token>.faiss         one FAISS index per shard
    shard-00000-<token>.ids.parquet   the id map: `faiss_id` (int64, ascending) -> `item_id`; a full
                                      build numbers the rows 0..n-1, an update keeps the ids of the rows
                                      it leaves and gives new rows ids above the largest (an index from
                                      before `faiss_id` existed maps row i to faiss id i)
                                      (<token>: unique to the publish, storage.part_name)
    ...
    _manifest.json            model_version, model_dir, embeddings (the table it was built from), dim,
                              metric, spec, shards [{faiss, ids, n_vectors}], search_params, tuning trials,
                              recall_at_10 vs exact on n_queries held-back queries, build_seconds, seed,
                              mode (build | update) and why, the last full build and the changes since
                              (pipeline/index_update.py)

Metric: inner product on L2-normalised vectors (= cosine similarity). All shards come from one trained
empty index (same coarse quantizer and codec), so a search parameter means the same on every shard.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.embedding_scan import merge_top_k

METRIC = "inner_product"

# Thresholds of `choose_index_spec` (after autofaiss's index selection), in vectors.
FLAT_MAX_N = 20_000  # below this an exact scan is as fast as any index and needs no training
HNSW_MAX_N = 200_000  # above this HNSW's build (graph insertion, ~n log n) is slower than training an IVF
HNSW_M = 32  # graph degree: HNSW costs 4d + 2*M*4 bytes per vector
IVF_TRAIN_PER_CENTROID = 39  # FAISS's own minimum for k-means (it warns below this)
MEMORY_HEADROOM = 1.2  # list/graph overheads and search buffers on top of the codes

class IndexFilesError(RuntimeError):
    """A shard file of an index dir is missing, unreadable, or disagrees with its id map."""


class RecallTooLowError(RuntimeError):
    """The built index cannot reach the requested recall with any search parameter tried."""


# --- the embedding table ---------------------------------------------------------------------------


def read_embedding_table(uri: str, item_ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Item ids [N] (object, str), vectors [N, D] float32 and manifest of a published embedding table.

    With `item_ids`, only those rows are read (a pushed-down filter). Raises FileNotFoundError when the
    table is not published and ValueError when its dim disagrees with its manifest.
    """
    manifest = storage.read_manifest(uri)
    fs, _ = storage.get_fs(uri)
    files = storage.parquet_files(uri)
    if not files:
        raise FileNotFoundError(f"embedding table {uri} has a manifest but no Parquet files. Re-run the embed stage.")
    filters = [("item_id", "in", [str(i) for i in item_ids])] if item_ids is not None else None
    table = pq.read_table(files, filesystem=fs, columns=["item_id", "embedding"], filters=filters)
    ids = table.column("item_id").cast(pa.string()).to_numpy(zero_copy_only=False).astype(object)
    vectors = storage.embedding_matrix(table.column("embedding")) if len(table) else np.zeros((0, manifest["dim"]), np.float32)
    if vectors.shape[1] != manifest["dim"]:
        raise ValueError(f"embedding table {uri}: vectors have dim {vectors.shape[1]}, manifest says {manifest['dim']}")
    return ids, vectors, manifest


# --- choosing and training the index ---------------------------------------------------------------


def n_centroids(n: int) -> int:
    """IVF list count: about 4 sqrt(n) (autofaiss uses 4-16 sqrt(n)), a power of two, and few enough
    that every centroid gets FAISS's minimum of training points."""
    target = 4 * math.sqrt(n)
    c = 2 ** max(0, round(math.log2(target)))
    return int(max(1, min(c, n // IVF_TRAIN_PER_CENTROID)))


def choose_index_spec(n: int, d: int, memory_budget_bytes: int) -> str:
    """A FAISS index_factory spec for `n` vectors of dim `d` that fits `memory_budget_bytes` (all shards).

    Tiers, best first (bytes per vector in brackets, times MEMORY_HEADROOM):
    - n < FLAT_MAX_N: `Flat`, exact [4d];
    - n < HNSW_MAX_N and budget allows: `HNSW32` [4d + 256];
    - `IVF{c},Flat` [4d + 8], else `IVF{c},SQ8` [d + 8] (8-bit scalar codes, near-exact on unit vectors);
    - else `IVF{c},PQ{d/2}x4fs,RFlat` [d/4 + 8 in RAM]: fast-scan PQ candidates re-ranked exactly against
      full vectors that are memory-mapped from the shard file at search time (plain PQ codes cannot
      separate near-duplicates). c = `n_centroids(n)`.
    Raises ValueError when even the last tier does not fit.
    """
    if n < 1 or d < 1:
        raise ValueError(f"need at least one vector of dim >= 1, got n={n}, d={d}")

    def fits(bytes_per_vector: int) -> bool:
        return n * bytes_per_vector * MEMORY_HEADROOM <= memory_budget_bytes

    if n < FLAT_MAX_N and fits(4 * d):
        return "Flat"
    if n < HNSW_MAX_N and fits(4 * d + 2 * HNSW_M * 4):
        return f"HNSW{HNSW_M}"
    c = n_centroids(n)
    if fits(4 * d + 8):
        return f"IVF{c},Flat"
    if fits(d + 8):
        return f"IVF{c},SQ8"
    if d % 2 == 0 and fits(d // 4 + 8):
        return f"IVF{c},PQ{d // 2}x4fs,RFlat"
    need = n * (d // 4 + 8) * MEMORY_HEADROOM
    raise ValueError(
        f"a memory budget of {memory_budget_bytes / 2**30:.2f} GiB is too small for {n} vectors of dim {d}: "
        f"the most compact index needs {need / 2**30:.2f} GiB. Raise --memory-budget."
    )


def train_empty_index(spec: str, sample: np.ndarray, seed: int) -> faiss.Index:
    """An empty index of `spec` (inner product), trained on `sample` [S, D] with a seeded k-means."""
    index = faiss.index_factory(sample.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    ivf = ivf_or_none(index)
    if ivf is not None:
        ivf.cp.seed = seed
    pq_ = _pq_or_none(index)
    if pq_ is not None:
        pq_.cp.seed = seed
    if not index.is_trained:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


def train_sample_size(spec: str, n: int) -> int:
    """How many vectors to train `spec` on: FAISS's minimum per IVF centroid (k-means cost is linear in
    it), at least 10,000 for the codecs, capped at n."""
    m = re.search(r"IVF(\d+)", spec)
    return min(n, max(int(m.group(1)) * IVF_TRAIN_PER_CENTROID, 10_000)) if m else min(n, 10_000)


def shard_of(item_ids: Sequence[Any], n_shards: int) -> np.ndarray:
    """Shard number of each item id: crc32 of its string form, stable across runs and machines."""
    return np.fromiter((zlib.crc32(str(i).encode()) for i in item_ids), dtype=np.int64, count=len(item_ids)) % n_shards


def shard_names(i: int) -> tuple[str, str]:
    return f"shard-{i:05d}.faiss", f"shard-{i:05d}.ids.parquet"


def fill_shard(
    trained: bytes, parts: Iterable[np.ndarray], item_ids: Callable[[], Sequence[Any]], out_uri: str, shard: int,
    threads: int,
) -> dict:
    """Add one shard's vectors, part by part, to a copy of the trained empty index and write the shard's two
    files; `item_ids()` gives the ids of every row added, once `parts` is exhausted.

    Returns the shard's manifest entry. faiss row ids are the rows in the order added.
    """
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    # HNSW insertion order depends on thread timing: one thread keeps the graph deterministic.
    faiss.omp_set_num_threads(1 if search_param_name(index) == "efSearch" else threads)
    for vectors in parts:
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    ids = item_ids()
    return write_shard(index, np.arange(index.ntotal, dtype=np.int64), ids, out_uri, shard)


def update_shard(
    index: faiss.Index, faiss_ids: np.ndarray, item_ids: np.ndarray, remove: Sequence[str],
    vectors: np.ndarray, add_ids: Sequence[Any], threads: int,
) -> tuple[faiss.Index, np.ndarray, np.ndarray]:
    """Remove the rows of the item ids in `remove` from a loaded shard and add `vectors` under `add_ids`;
    the trained quantizer and codec stay. Returns (index, faiss_ids, item_ids), the id map ascending.

    An IVF shard keeps the faiss ids of the rows it keeps and numbers new rows above the largest; a Flat
    shard renumbers its rows 0..n-1 (FAISS compacts it), which the returned map follows. HNSW cannot
    remove vectors: ValueError.
    """
    if not updatable(type(faiss.downcast_index(index)).__name__):
        raise ValueError(f"a {type(faiss.downcast_index(index)).__name__} shard cannot remove vectors: rebuild it")
    faiss.omp_set_num_threads(threads)
    # a hash lookup (Arrow's is_in): numpy's isin on object arrays sorts them, 10 s on 250k ids
    gone = pc.is_in(pa.array(item_ids, pa.string()), value_set=pa.array(list(remove), pa.string())).to_numpy(zero_copy_only=False)
    if gone.any():
        index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(faiss_ids[gone], dtype=np.int64)))
    faiss_ids, item_ids = faiss_ids[~gone], item_ids[~gone]
    stable = ivf_or_none(index) is not None
    if not stable:
        faiss_ids = np.arange(len(item_ids), dtype=np.int64)
    if len(vectors):
        first = int(faiss_ids[-1]) + 1 if len(faiss_ids) else 0
        new = np.arange(first, first + len(vectors), dtype=np.int64)
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        index.add_with_ids(x, new) if stable else index.add(x)
        faiss_ids = np.concatenate([faiss_ids, new])
        item_ids = np.concatenate([item_ids, np.asarray([str(i) for i in add_ids], dtype=object)])
    if index.ntotal != len(item_ids):
        raise IndexFilesError(f"shard holds {index.ntotal} vectors after the update but its id map {len(item_ids)}")
    return index, faiss_ids, item_ids


def updatable(spec: str) -> bool:
    """Whether shards of `spec` (a factory string or an index class name) can remove and add vectors in
    place: Flat and IVF can; HNSW cannot remove from its graph, a refined index (RFlat) neither."""
    return spec in ("Flat", "IndexFlat", "IndexFlatIP") or (spec.startswith(("IVF", "IndexIVF")) and not spec.endswith("RFlat"))


def write_shard(index: faiss.Index, faiss_ids: np.ndarray, item_ids: Sequence[Any], out_uri: str, shard: int) -> dict:
    """Write one shard's FAISS file and id map under fresh names in `out_uri`; returns its manifest entry."""
    faiss_name, ids_name = (storage.part_name(out_uri, name) for name in shard_names(shard))
    write_index(index, storage.join(out_uri, faiss_name))
    fs, ids_path = storage.get_fs(storage.join(out_uri, ids_name))
    with fs.open(ids_path, "wb") as f:
        ids = item_ids if isinstance(item_ids, (pa.Array, pa.ChunkedArray)) else pa.array([str(i) for i in item_ids], pa.string())
        pq.write_table(pa.table({"faiss_id": pa.array(faiss_ids, pa.int64()), "item_id": ids}), f)
    return {"faiss": faiss_name, "ids": ids_name, "n_vectors": int(index.ntotal)}


def read_shard(uri: str, entry: dict, spec: str, cache_dir: str) -> IndexShard:
    """One shard of an index dir (a manifest entry), checked against its id map and the manifest's vector
    count; IndexFilesError naming the file when it is missing, unreadable or disagrees."""
    fix = f"Rebuild the index with `item-pipeline build-index ... {uri} --overwrite`."
    faiss_uri, ids_uri = storage.join(uri, entry["faiss"]), storage.join(uri, entry["ids"])
    for part in (faiss_uri, ids_uri):
        if not storage.exists(part):
            raise IndexFilesError(f"index shard file {part} is missing. {fix}")
    try:
        index = _read_index(faiss_uri, spec, cache_dir)
    except RuntimeError as e:
        raise IndexFilesError(f"index shard {faiss_uri} cannot be read ({_first_line(e)}). {fix}") from e
    try:
        fs, ids_path = storage.get_fs(ids_uri)
        with fs.open(ids_path, "rb") as f:
            table = pq.read_table(f)
        ids = table.column("item_id").to_numpy(zero_copy_only=False).astype(object)
        faiss_ids = (table.column("faiss_id").to_numpy() if "faiss_id" in table.column_names
                     else np.arange(len(ids), dtype=np.int64))  # written before faiss_id existed: row = id
    except (pa.ArrowException, KeyError, OSError) as e:
        raise IndexFilesError(f"id map {ids_uri} cannot be read ({e}). {fix}") from e
    if index.ntotal != len(ids) or index.ntotal != entry["n_vectors"] or np.any(np.diff(faiss_ids) <= 0):
        raise IndexFilesError(
            f"index shard {faiss_uri} holds {index.ntotal} vectors, but its id map has {len(ids)} rows (ascending "
            f"faiss ids: {bool(np.all(np.diff(faiss_ids) > 0))}) and the manifest says {entry['n_vectors']}. {fix}"
        )
    return IndexShard(entry["faiss"], index, ids, faiss_ids)


def write_index(index: faiss.Index, uri: str) -> None:
    """faiss.write_index to a local path, or to a local temp file uploaded with fsspec."""
    if storage.is_local(uri):
        faiss.write_index(index, storage.get_fs(uri)[1])
        return
    fs, path = storage.get_fs(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "index.faiss")
        faiss.write_index(index, local)
        fs.put(local, path)


def _read_index(uri: str, spec: str, cache_dir: str) -> faiss.Index:
    # RFlat's full vectors are memory-mapped, not loaded: they are only touched to re-rank candidates.
    flags = faiss.IO_FLAG_MMAP_IFC if spec.endswith("RFlat") else 0
    if storage.is_local(uri):
        return faiss.read_index(storage.get_fs(uri)[1], flags)
    fs, path = storage.get_fs(uri)
    local = os.path.join(cache_dir, os.path.basename(path))
    fs.get(path, local)
    return faiss.read_index(local, flags)


# --- search parameters -----------------------------------------------------------------------------


def ivf_or_none(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _pq_or_none(index: faiss.Index) -> faiss.ProductQuantizer | None:
    ivf = ivf_or_none(index)
    return getattr(ivf, "pq", None) if ivf is not None else None


def search_param_name(index: faiss.Index) -> str | None:
    """The parameter that trades speed for recall: 'nprobe' (IVF), 'efSearch' (HNSW), or None (exact)."""
    if ivf_or_none(index) is not None:
        return "nprobe"
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return "efSearch"
    return None


def set_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Apply search parameters (as recorded in the manifest) to one shard."""
    for name, value in params.items():
        if name == "k_factor":
            faiss.downcast_index(index).k_factor = value
        else:
            faiss.ParameterSpace().set_index_parameter(index, name, value)


# --- the sharded index -----------------------------------------------------------------------------


@dataclass
class IndexShard:
    """One shard: its FAISS index and the item id of each faiss row."""

    name: str  # file name of the FAISS index, e.g. shard-00003.faiss
    index: faiss.Index
    item_ids: np.ndarray  # [n] object (str): row of the id map -> item_id
    faiss_ids: np.ndarray | None = None  # [n] int64 ascending: row of the id map -> faiss id (None: the row)

    def __post_init__(self) -> None:
        if self.faiss_ids is None:
            self.faiss_ids = np.arange(len(self.item_ids), dtype=np.int64)


class ShardedIndex:
    """All shards of an index dir, searched together; results are the merged top-k over shards."""

    def __init__(self, shards: list[IndexShard], dim: int, search_params: dict[str, int] | None = None):
        self.shards = shards
        self.dim = dim
        self.search_s = 0.0
        self._bases = np.cumsum([0] + [s.index.ntotal for s in shards[:-1]]).astype(np.int64)
        self._item_ids = np.concatenate([s.item_ids for s in shards]) if shards else np.zeros(0, dtype=object)
        self.search_params: dict[str, int] = {}
        self.set_search_params(search_params or {})

    @property
    def ntotal(self) -> int:
        return sum(s.index.ntotal for s in self.shards)

    @classmethod
    def open(cls, uri: str, shards: list[dict], dim: int, spec: str, search_params: dict[str, int]) -> ShardedIndex:
        """Load the shard files listed in `shards` (manifest entries) from `uri`, checking each one.

        Raises IndexFilesError naming the shard when a file is missing, unreadable, or its id map
        does not match the index's vector count.
        """
        fix = f"Rebuild the index with `item-pipeline build-index ... {uri} --overwrite`."
        with tempfile.TemporaryDirectory() as cache_dir:
            loaded = [read_shard(uri, entry, spec, cache_dir) for entry in shards]
        for shard in loaded:
            if shard.index.d != dim:
                raise IndexFilesError(f"index shard {shard.name} holds vectors of dim {shard.index.d}, the manifest says {dim}. {fix}")
        _check_same_quantizer(loaded, fix)
        return cls(loaded, dim, search_params)

    @classmethod
    def load(cls, uri: str) -> ShardedIndex:
        """Load a published index dir (the manifest says which shards, the spec and search parameters)."""
        manifest = storage.read_manifest(uri)
        return cls.open(uri, manifest["shards"], manifest["dim"], manifest["spec"], manifest["search_params"])

    def set_search_params(self, params: dict[str, int]) -> None:
        for shard in self.shards:
            set_search_params(shard.index, params)
        self.search_params = dict(params)

    def coarse_assignment(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(centroid ids, scores) [Q, nprobe] when all shards are plain IVF over one quantizer, else None.

        The shards share the trained quantizer, so the nearest lists are found once for all shards instead
        of once per shard (with thousands of lists this is a large part of a search); an index opened with
        some of its shards can take the lists another one assigned (`search(..., coarse=)`).
        """
        if not self.shards or not all(isinstance(s.index, faiss.IndexIVF) for s in self.shards):
            return None
        first = self.shards[0].index
        scores, lists = first.quantizer.search(queries, first.nprobe)
        return lists, scores

    def search(self, queries: np.ndarray, k: int,
               coarse: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over all shards for `queries` [Q, D] (L2-normalised); `coarse`: their `coarse_assignment`,
        when already made.

        Returns (scores [Q, k] float32, descending; item_ids [Q, k] object, None where fewer than k hits).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got shape {queries.shape}")
        start = time.perf_counter()
        if coarse is None:
            coarse = self.coarse_assignment(queries)
        order = None
        if coarse is not None:
            # the queries grouped by their nearest list: consecutive queries then scan the same lists while
            # these are still in cache (bench/bench_ivf_order.py: scans 1.2-1.5x faster at 1M, no gain at 4M in
            # SQ8; the same results)
            order = np.argsort(coarse[0][:, 0], kind="stable")
            queries, coarse = queries[order], (coarse[0][order], coarse[1][order])
        # FAISS's own result merge: a min-heap of the k best per query over every shard's top-k, on global
        # row numbers (a shard's row r is base[s] + r); then the id maps turn rows into item ids
        heap = faiss.ResultHeap(len(queries), k, keep_max=True)
        for shard, base in zip(self.shards, self._bases):
            d, i = shard.index.search(queries, k) if coarse is None else shard.index.search_preassigned(queries, k, *coarse)
            row = np.searchsorted(shard.faiss_ids, i)  # faiss id -> row of the shard's id map
            heap.add_result(d, np.where(i < 0, -1, row + base))
        heap.finalize()
        rows, scores = heap.I, heap.D
        if order is not None:  # back to the caller's order
            back = np.empty_like(order)
            back[order] = np.arange(len(order))
            rows, scores = rows[back], scores[back]
        self.search_s = time.perf_counter() - start  # as ShardByShard.search_s: the last search's time
        found = rows >= 0
        ids = np.full(rows.shape, None, dtype=object)
        ids[found] = self._item_ids[rows[found]]
        return np.where(found, scores, np.nan).astype(np.float32), ids


class ShardByShard:
    """`ShardedIndex`'s search (`set_search_params`, `search`) over the shards of an index dir holding one
    shard in memory at a time: each search reads every shard once and merges their top-k (ties between
    shards go to the earlier shard). For a few queries, or for the build's tuning, where the whole index
    should not be loaded. The first shard stays loaded (`shards`: its type says which parameter to tune) and
    is searched without being read again.
    `search_s` is the last search's time in FAISS, the shards' reading left out."""

    def __init__(self, uri: str, shards: list[dict], dim: int, spec: str, search_params: dict[str, int] | None = None):
        self.uri, self.entries, self.dim, self.spec = uri, shards, dim, spec
        self.search_params = dict(search_params or {})
        self._first = ShardedIndex.open(uri, shards[:1], dim, spec, {})  # searched as it is, not read again
        self.shards = self._first.shards
        self.search_s = 0.0

    @classmethod
    def load(cls, uri: str) -> ShardByShard:
        """Over a published index dir, at its tuned search parameters."""
        manifest = storage.read_manifest(uri)
        return cls(uri, manifest["shards"], manifest["dim"], manifest["spec"], manifest["search_params"])

    def set_search_params(self, params: dict[str, int]) -> None:
        self.search_params = dict(params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """As `ShardedIndex.search`: (scores [Q, k] float32, item_ids [Q, k] object, None where missing)."""
        parts, self.search_s = [], 0.0
        self._first.set_search_params(self.search_params)
        for n, entry in enumerate(self.entries):
            shard = self._first if n == 0 else ShardedIndex.open(self.uri, [entry], self.dim, self.spec, self.search_params)
            start = time.perf_counter()
            d, found = shard.search(queries, k)
            self.search_s += time.perf_counter() - start
            parts.append((np.where(np.isnan(d), -np.inf, d), found))
        scores, ids = merge_top_k(parts, k)
        return np.where(np.isfinite(scores), scores, np.nan).astype(np.float32), ids


def _check_same_quantizer(shards: list[IndexShard], fix: str) -> None:
    """IVF shards must come from one trained index: search assigns lists once for all of them."""
    ivfs = [(s.name, s.index) for s in shards if isinstance(s.index, faiss.IndexIVF)]
    if len(ivfs) < 2:
        return
    centroids = ivfs[0][1].quantizer.reconstruct_n(0, ivfs[0][1].nlist)
    for name, ivf in ivfs[1:]:
        if ivf.nlist != len(centroids) or not np.array_equal(ivf.quantizer.reconstruct_n(0, ivf.nlist), centroids):
            raise IndexFilesError(f"index shard {name} was not built from the same trained quantizer as {ivfs[0][0]}. {fix}")


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__
