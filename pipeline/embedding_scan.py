"""Streamed reads of a published embedding table: record batches, rows by position or by id, and the exact
top-k of some queries over the whole table. One batch is in memory at a time, so what the caller holds
does not grow with the table (the index build, its update and its recall measurements use these).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage

EXACT_CHUNK = 16_384  # table rows per matrix product of the exact top-k ...
QUERY_BLOCK = 512  # ... and queries: [512, 16k] scores (32 MiB) stay small whatever the number of queries


def file_rows(embeddings_uri: str) -> list[int]:
    """Rows of each of a table's files in storage order, from the Parquet footers (no data read)."""
    fs, _ = storage.get_fs(embeddings_uri)
    rows = []
    for path in storage.parquet_files(embeddings_uri):
        with fs.open(path, "rb") as f:
            rows.append(pq.ParquetFile(f).metadata.num_rows)
    return rows


def num_rows(embeddings_uri: str) -> int:
    """Rows of a table, from the Parquet footers (no data read)."""
    return sum(file_rows(embeddings_uri))


def batches(embeddings_uri: str, columns: list[str], files: list[str] | None = None,
            start: int = 0, stop: int | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of a published table (or of the named files of it) in storage order, restricted to
    its rows start..stop-1: files wholly outside the range are skipped after reading their footer."""
    fs, _ = storage.get_fs(embeddings_uri)
    paths = storage.parquet_files(embeddings_uri) if files is None else [
        storage.get_fs(storage.join(embeddings_uri, f))[1] for f in files]
    base = 0
    for path in paths:
        if stop is not None and base >= stop:
            return
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            n = parquet.metadata.num_rows
            if base + n > start:
                for batch in parquet.iter_batches(batch_size=65_536, columns=columns):
                    lo, hi = max(start - base, 0), len(batch) if stop is None else min(stop - base, len(batch))
                    if hi > lo:
                        yield batch.slice(lo, hi - lo)
                    base += len(batch)
                    if stop is not None and base >= stop:
                        return
            else:
                base += n


def gather(embeddings_uri: str, positions: np.ndarray, columns: tuple[str, ...] = ("item_id", "embedding")
           ) -> dict[str, np.ndarray]:
    """The table's rows at `positions` (row numbers in storage order), in ascending position order:
    {"item_id": [P] object, "embedding": [P, D] float32} (the columns asked for), in one streamed pass over
    the rows from the first position to the last."""
    positions = np.unique(np.asarray(positions, dtype=np.int64))
    parts: dict[str, list] = {c: [] for c in columns}
    base = int(positions[0]) if len(positions) else 0
    stop = int(positions[-1]) + 1 if len(positions) else 0
    for batch in batches(embeddings_uri, list(columns), start=base, stop=stop):
        lo, hi = np.searchsorted(positions, [base, base + len(batch)])
        if hi > lo:
            picked = batch.take(pa.array(positions[lo:hi] - base))
            for c in columns:
                parts[c].append(_values(picked.column(c), c))
        base += len(batch)
    empty = {"item_id": np.zeros(0, dtype=object), "embedding": np.zeros((0, 0), dtype=np.float32)}
    return {c: np.concatenate(v) if v else empty[c] for c, v in parts.items()}


def _values(column: pa.Array, name: str) -> np.ndarray:
    if name == "embedding":
        return storage.embedding_matrix(column)
    return column.cast(pa.string()).to_numpy(zero_copy_only=False).astype(object)


def exact_top_k(embeddings_uri: str, queries: np.ndarray, k: int, start: int = 0, stop: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The exact inner-product top-k of `queries` among the table's rows start..stop-1: (scores [Q, k]
    float32, descending, -inf where the range has fewer than k rows; item ids [Q, k] object, None there).

    Read one record batch at a time, so the range's vectors are never all held: per chunk of rows one
    matrix product, and only scores above a query's current k-th best are kept (after the first chunks, a
    few per query). The neighbours' item ids are read in a second pass over the id column of the range."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)  # descending per row
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    base = start
    for batch in batches(embeddings_uri, ["embedding"], start=start, stop=stop):
        vectors = storage.embedding_matrix(batch.column(0))
        for first in range(0, len(vectors), EXACT_CHUNK):
            chunk = vectors[first:first + EXACT_CHUNK]
            for q in range(0, len(queries), QUERY_BLOCK):  # temporaries of [QUERY_BLOCK, EXACT_CHUNK] at most
                block = slice(q, q + QUERY_BLOCK)
                best_s[block], best_i[block] = _merge_top_k(best_s[block], best_i[block], queries[block] @ chunk.T,
                                                            base + first)
        base += len(vectors)
    found = best_i >= 0
    needed = np.unique(best_i[found])
    ids = gather(embeddings_uri, needed, ("item_id",))["item_id"]  # only the rows that are someone's neighbour
    out = np.full(best_i.shape, None, dtype=object)
    out[found] = ids[np.searchsorted(needed, best_i[found])]
    return best_s, out


def exact_neighbours_streamed(embeddings_uri: str, queries: np.ndarray, k: int) -> np.ndarray:
    """Item ids [Q, k] of the exact inner-product top-k of `queries` over a whole table, in this process
    (index_build.exact_neighbours splits the same scan over Ray tasks)."""
    return exact_top_k(embeddings_uri, queries, k)[1]


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], ids [Q, k]) of the best k of several (scores, ids) top-k lists of the same queries over
    disjoint parts (row ranges, shards), given in order: ties go to the earlier part, as in one scan; a
    missing hit scores -inf."""
    scores = np.concatenate([s for s, _ in parts], axis=1)
    ids = np.concatenate([i for _, i in parts], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _merge_top_k(best_s: np.ndarray, best_i: np.ndarray, scores: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k (descending) of `best` [Q, k] and the scores [Q, B] of rows base..base+B-1."""
    k = best_s.shape[1]
    above = scores > best_s[:, -1:]
    counts = np.count_nonzero(above, axis=1)
    if counts.max() > 4 * k:  # the first chunks: a partial sort of each row
        top = np.argpartition(-scores, min(k, scores.shape[1]) - 1, axis=1)[:, :k]
        cand_s, cand_i = np.take_along_axis(scores, top, axis=1), top + base
    else:  # later ones: the few scores above the k-th best, padded into [Q, max count]
        hit = np.flatnonzero(counts)  # most queries have none: look for the columns in the others' rows only
        rows, cols = np.nonzero(above[hit])
        rows = hit[rows]
        slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        cand_s = np.full((len(scores), max(int(counts.max()), 1)), -np.inf, dtype=np.float32)
        cand_i = np.full(cand_s.shape, -1, dtype=np.int64)
        cand_s[rows, slot], cand_i[rows, slot] = scores[rows, cols], cols + base
    merged_s, merged_i = np.concatenate([best_s, cand_s], axis=1), np.concatenate([best_i, cand_i], axis=1)
    order = np.argsort(-merged_s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(merged_s, order, axis=1), np.take_along_axis(merged_i, order, axis=1)


def read_vectors(embeddings_uri: str, item_ids: np.ndarray, dim: int,
                 files: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of the rows of `item_ids` in a table (or in the named files of it), in one streamed pass
    (a hash lookup per batch)."""
    wanted = pa.array(list(item_ids), pa.string())
    ids, vectors = [], []
    for batch in batches(embeddings_uri, ["item_id", "embedding"], files):
        keep = pc.is_in(batch.column(0).cast(pa.string()), value_set=wanted)
        if pc.any(keep).as_py():
            part = batch.filter(keep)
            ids.append(part.column(0).cast(pa.string()).to_numpy(zero_copy_only=False).astype(object))
            vectors.append(storage.embedding_matrix(part.column(1)))
    if not ids:
        return np.zeros(0, object), np.zeros((0, dim), np.float32)
    return np.concatenate(ids), np.concatenate(vectors)


