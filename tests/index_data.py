"""Generated embedding tables with known structure (duplicate groups, categories) for the index tests."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage


@dataclass
class Catalog:
    """Generated items: `categories` cluster centres; duplicate groups = a base vector + small noise."""

    item_ids: np.ndarray  # [N] object (str)
    vectors: np.ndarray  # [N, D] float32, L2-normalised
    category: np.ndarray  # [N] object: true category of every item
    group_id: np.ndarray  # [N] object: duplicate group, None for items without duplicates
    ambiguous: np.ndarray  # [N] bool: halfway between two categories


def make_catalog(n: int = 3000, d: int = 32, n_categories: int = 8, n_groups: int = 150, seed: int = 0) -> Catalog:
    """`n` items in `n_categories` clusters; the first `n_groups` * 3 items form groups of 3 near-duplicates."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_categories, d)).astype(np.float32)
    cat = rng.integers(0, n_categories, size=n)
    # items spread around their category centre; a tenth sit halfway to another category's centre, where a
    # neighbour vote is split and backfill should abstain
    vectors = centres[cat] + 0.55 * rng.standard_normal((n, d)).astype(np.float32)
    ambiguous = rng.random(n) < 0.1
    ambiguous[: 3 * n_groups] = False  # duplicate groups are clear members of their category
    other = (cat + rng.integers(1, n_categories, size=n)) % n_categories
    vectors[ambiguous] = 0.5 * (vectors[ambiguous] + centres[other[ambiguous]])
    group = np.full(n, None, dtype=object)
    for g in range(n_groups):
        rows = np.arange(3 * g, 3 * g + 3)
        cat[rows] = cat[rows[0]]
        vectors[rows] = vectors[rows[0]] + 0.03 * rng.standard_normal((3, d)).astype(np.float32)
        group[rows] = f"g{g}"
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(n)  # groups are not in adjacent rows
    ids = np.array([f"item-{i:06d}" for i in range(n)], dtype=object)
    labels = np.array([f"cat{c}" for c in cat], dtype=object)
    return Catalog(ids, vectors[order], labels[order], group[order], ambiguous[order])


def write_embedding_table(uri: str, ids: np.ndarray, vectors: np.ndarray, n_files: int = 2,
                          hashes: np.ndarray | None = None) -> None:
    """A published embedding table as the embed stage writes it (contract in ARCHITECTURE.md); the content
    hash of row i is `hashes[i]`, or "h<i>"."""
    n, d = vectors.shape
    with storage.staging(uri) as stage:
        for f, rows in enumerate(np.array_split(np.arange(n), n_files)):
            table = pa.table(
                {
                    "item_id": pa.array(ids[rows].tolist(), pa.string()),
                    "embedding": storage.embedding_array(vectors[rows]),
                    "modalities": pa.array(["image+title"] * len(rows)),
                    "content_hash": pa.array([f"h{i}" for i in rows] if hashes is None else list(hashes[rows])),
                    "model_version": pa.array(["test-model-v1"] * len(rows)),
                    "embedded_at": pa.array([dt.datetime(2025, 1, 1)] * len(rows), pa.timestamp("us")),
                }
            )
            fs, path = storage.get_fs(storage.join(stage, f"part-{f:05d}.parquet"))
            with fs.open(path, "wb") as fh:
                pq.write_table(table, fh, **storage.parquet_options(table.schema))
        storage.publish(stage, uri, {"model_version": "test-model-v1", "dim": d, "model_dir": "/models/test", "rows": n})
