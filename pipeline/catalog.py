"""The one catalog reader: column mapping, up-front schema validation, the id rule, the id pass and
content hashes. Every job reads a catalog through here: `open_dataset` (pyarrow, for metadata and label
columns), `read_rows` (Ray Data, for the heavy columns: titles and image bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs as pafs

from . import storage

if TYPE_CHECKING:
    import pandas as pd
    import ray.data


class CatalogSchemaError(ValueError):
    """The catalog lacks a required column or has one of the wrong type; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class ColumnMap:
    """Catalog column names, each overridable (`--column-map id=sku,title=name`)."""

    item_id: str = "item_id"  # string or integer (integers are cast to string)
    title: str = "title"  # string; null or "" = no title
    image: str = "image"  # binary encoded JPEG/PNG/WebP bytes; null = no image
    image_uri: str = "image_uri"  # string, local path or s3:// URI: used when `image` is absent
    category: str = "category"  # string, null = unknown (not needed by the embedding job)
    group_id: str = "group_id"  # ground-truth group, evaluation only

    # the keys accepted on the command line (a class constant: no annotation, so not a field)
    ALIASES = {"id": "item_id", "item_id": "item_id", "title": "title", "image": "image",
               "image_uri": "image_uri", "category": "category", "group_id": "group_id", "group": "group_id"}

    @classmethod
    def parse(cls, spec: str | None) -> "ColumnMap":
        """`"id=sku,title=name,image=photo"` -> ColumnMap; unknown keys fail with the list of valid ones."""
        if not spec:
            return cls()
        fields: dict[str, str] = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise ValueError(f"--column-map entry {part!r} is not KEY=COLUMN (e.g. id=sku,title=name)")
            if key not in cls.ALIASES:
                raise ValueError(f"--column-map key {key!r} is unknown; use one of {sorted(set(cls.ALIASES))}")
            fields[cls.ALIASES[key]] = value
        return cls(**fields)

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem over `storage.get_fs` (so local, s3:// and endpoint overrides behave the
    same for pyarrow and Ray as for fsspec), and the bare path."""
    fs, path = storage.get_fs(uri)
    if storage.is_local(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def open_dataset(uri: str) -> pds.Dataset:
    """A pyarrow dataset over a Parquet file or a directory/prefix of them (files in sorted order)."""
    fs, path = arrow_filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"catalog {uri} does not exist")
    files = storage.parquet_files(uri)  # one rule for what counts as data: `_`/`.` paths do not
    if not files:
        raise FileNotFoundError(f"catalog {uri} holds no .parquet files")
    return pds.dataset(files, filesystem=fs, format="parquet")


def read_rows(uri: str, columns: list[str]) -> "ray.data.Dataset":
    """The catalog's `columns` as a Ray dataset, over the same files as `open_dataset` (sorted; `_`- and
    `.`-prefixed paths are not data)."""
    fs, _ = arrow_filesystem(uri)
    return storage.read_dataset(open_dataset(uri).files, fs, columns)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def validate_schema(uri: str, columns: ColumnMap) -> tuple[pa.Schema, list[str]]:
    """Check the catalog's schema (Parquet footer only) and return it with the columns the embedding
    job must read. Raises `CatalogSchemaError` naming the column and the fix."""
    schema = open_dataset(uri).schema
    have = schema.names

    def missing(role: str, option: str) -> CatalogSchemaError:
        return CatalogSchemaError(
            f"column {getattr(columns, role)!r} ({role}) is missing; the catalog has {have}; "
            f"map yours with --column-map {option}=NAME"
        )

    def mistyped(role: str, want: str) -> CatalogSchemaError:
        name = getattr(columns, role)
        return CatalogSchemaError(
            f"column {name!r} ({role}) has type {schema.field(name).type}, expected {want}; "
            f"cast it in the catalog or map another column with --column-map"
        )

    if columns.item_id not in have:
        raise missing("item_id", "id")
    t = schema.field(columns.item_id).type
    if not (_is_string(t) or pa.types.is_integer(t)):
        raise mistyped("item_id", "string or integer")
    if columns.title not in have:
        raise missing("title", "title")
    if not _is_string(schema.field(columns.title).type):
        raise mistyped("title", "string")
    needed = [columns.item_id, columns.title]
    if columns.image in have:
        if not _is_binary(schema.field(columns.image).type):
            raise mistyped("image", "binary (encoded JPEG/PNG/WebP bytes)")
        needed.append(columns.image)
    elif columns.image_uri in have:
        if not _is_string(schema.field(columns.image_uri).type):
            raise mistyped("image_uri", "string (local path or s3:// URI)")
        needed.append(columns.image_uri)
    else:
        raise CatalogSchemaError(
            f"neither an image column {columns.image!r} nor an image URI column {columns.image_uri!r} is in "
            f"the catalog; it has {have}; map yours with --column-map image=NAME or image_uri=NAME"
        )
    return schema, needed


def id_as_string(ids: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Item ids are strings in every output; integer ids are cast (nulls stay null)."""
    return ids if _is_string(ids.type) else pc.cast(ids, pa.string())


def check_label_columns(uri: str, columns: ColumnMap) -> pds.Dataset:
    """The catalog's dataset, once its id and category columns are found (CatalogSchemaError naming the
    missing one and the fix otherwise); reads the footers only."""
    dataset = open_dataset(uri)
    have = dataset.schema.names
    for role in ("item_id", "category"):
        if getattr(columns, role) not in have:
            raise CatalogSchemaError(f"column {getattr(columns, role)!r} ({role}) is missing; the catalog has "
                                     f"{have}; map yours with --column-map {role}=NAME")
    return dataset


def read_labels(uri: str, columns: ColumnMap) -> "pd.DataFrame":
    """The label columns of a catalog, one row per item the embed stage keeps: `item_id` (the same string
    form as in every output), `category` (null = unknown) and, where the catalog has them, `group_id` and
    `true_category`. Columns are found through `columns`; the id rule is the embed stage's: a null id and
    every repeat of an id after its first occurrence (sorted files, then row order) are dropped.

    Ids are cast to strings in Arrow, before pandas: an integer column with a null would otherwise
    become float and read '101.0' where the embedding table says '101'.
    """
    dataset = check_label_columns(uri, columns)
    have = dataset.schema.names
    wanted = {"item_id": columns.item_id, "category": columns.category, "group_id": columns.group_id,
              "true_category": "true_category"}
    present = {role: name for role, name in wanted.items() if name in have}
    table = dataset.to_table(columns=list(present.values()))
    frame = pa.table({role: id_as_string(table.column(name)) if role in ("item_id", "group_id") else table.column(name)
                      for role, name in present.items()}).to_pandas()
    return frame[frame["item_id"].notna()].drop_duplicates("item_id", keep="first").reset_index(drop=True)


NOT_IN_CATALOG, NO_LABEL = -2, -1  # LabelIndex label codes that are not a class


def id_hash(ids: pa.Array | np.ndarray, seed: int = 0, bits: int = 64) -> np.ndarray:
    """[n] uint64: a seeded 64-bit hash of each string id (polars'; the same in every process of one
    installation), truncated to `bits` (tests force collisions with few bits)."""
    import polars as pl

    h = pl.Series(ids, dtype=pl.String).hash(seed=seed).to_numpy().astype(np.uint64)
    return h if bits >= 64 else h & np.uint64((1 << bits) - 1)


@dataclasses.dataclass
class LabelIndex:
    """A catalog's labels keyed by item id, compact enough to hold for 100M listings: every id the embed
    stage keeps (read_labels' id rule) as a 64-bit hash, sorted, with its labels' class codes (`category`,
    and `true_category` where the catalog has it; NO_LABEL where null): 12-16 bytes a listing, no Python
    strings. The rare ids whose hash another id shares are kept by string in `exact`. Exact for the
    catalog's ids; an id the catalog lacks reads as NOT_IN_CATALOG unless its hash is a catalog id's
    (odds n / 2^64). Build it with `read_label_index`."""

    hashes: np.ndarray  # [n] uint64, sorted, unique
    labels: np.ndarray  # [n, L] int32 class codes: column 0 category, column 1 true_category (when present)
    classes: np.ndarray  # [c] object: class code -> label string
    exact: dict[str, np.ndarray]  # id -> [L] codes, for the ids whose hash collides
    collided: np.ndarray  # sorted uint64: the hashes of the ids in `exact`
    bits: int = 64

    def find(self, ids: pa.Array | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hashes [n], row in `hashes` / `labels` [n], -1 where the id is absent, null or in `exact`)."""
        h = id_hash(ids, bits=self.bits)
        if not len(self.hashes):
            return h, np.full(len(h), -1)
        at = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        valid = pc.is_valid(pa.array(ids, pa.string())).to_numpy(zero_copy_only=False)
        return h, np.where((self.hashes[at] == h) & valid, at, -1)

    def lookup(self, ids: pa.Array | np.ndarray, found: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """[n, L] class codes of `ids`: NOT_IN_CATALOG for an id the catalog lacks (or a null id). `found`:
        `find(ids)`, when the caller has it already."""
        h, rows = found if found is not None else self.find(ids)
        out = np.where(rows[:, None] >= 0, self.labels[np.maximum(rows, 0)] if len(self.labels) else 0,
                       NOT_IN_CATALOG).astype(np.int32)
        for i in np.flatnonzero(np.isin(h, self.collided)):
            key = ids[i].as_py() if isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids[i]
            out[i] = self.exact.get(key, NOT_IN_CATALOG)
        return out


def read_label_index(uri: str, columns: ColumnMap, bits: int = 64) -> LabelIndex:
    """The catalog's LabelIndex, read batch by batch (the id and label columns only; no batch is kept as
    strings): the memory is the index's 12-16 bytes a listing, plus a batch and the sort's temporaries."""
    dataset = check_label_columns(uri, columns)
    label_columns = [columns.category] + (["true_category"] if "true_category" in dataset.schema.names else [])
    classes: dict[str, int] = {}
    h1s, h2s, labels = [], [], []
    for ids, codes in _label_batches(dataset, columns.item_id, label_columns, classes):
        h1s.append(id_hash(ids, bits=bits))
        h2s.append(id_hash(ids, seed=1))
        labels.append(codes)
    h1 = np.concatenate([np.array([], np.uint64), *h1s])
    h2 = np.concatenate([np.array([], np.uint64), *h2s])
    codes = np.concatenate([np.zeros((0, len(label_columns)), np.int32), *labels])
    order = np.lexsort((np.arange(len(h1)), h2, h1))  # by hash; a repeated id's first occurrence first
    h1, h2, codes = h1[order], h2[order], codes[order]
    first = np.r_[True, (h1[1:] != h1[:-1]) | (h2[1:] != h2[:-1])]  # both hashes equal: a repeat of the id
    h1, codes = h1[first], codes[first]
    same = h1[1:] == h1[:-1]
    shared = np.r_[same, False] | np.r_[False, same]  # two different ids, one hash
    collided = np.unique(h1[shared])
    exact = {}
    if len(collided):  # rare: read the ids again for these hashes only
        for ids, batch_codes in _label_batches(dataset, columns.item_id, label_columns, classes):
            for i in np.flatnonzero(np.isin(id_hash(ids, bits=bits), collided)):
                exact.setdefault(ids[i].as_py(), batch_codes[i])
    names = np.empty(len(classes), dtype=object)
    names[list(classes.values())] = list(classes)
    return LabelIndex(h1[~shared], codes[~shared], names, exact, collided, bits)


def _label_batches(dataset: pds.Dataset, id_column: str, label_columns: list[str],
                   classes: dict[str, int]) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """(string ids [n], label class codes [n, L]) of each batch, nulls ids dropped, in the id rule's order
    (sorted files, then row order); `classes` grows with each label string seen."""
    for fragment in dataset.get_fragments():
        for batch in fragment.to_batches(columns=[id_column, *label_columns]):
            ids = id_as_string(batch.column(0))
            valid = pc.is_valid(ids)
            codes = np.empty((batch.num_rows, len(label_columns)), np.int32)
            for j, column in enumerate(batch.columns[1:]):
                encoded = pc.dictionary_encode(column).combine_chunks() if isinstance(column, pa.ChunkedArray) \
                    else pc.dictionary_encode(column)
                lookup = np.array([classes.setdefault(v, len(classes)) for v in encoded.dictionary.to_pylist()] + [NO_LABEL],
                                  dtype=np.int32)
                codes[:, j] = lookup[encoded.indices.fill_null(len(lookup) - 1).to_numpy()]
            yield ids.filter(valid), codes[valid.to_numpy(zero_copy_only=False)]


def duplicate_ids(*parts: pa.Table) -> set[str]:
    """Ids that occur more than once in the first column of `parts` (string ids, nulls dropped): the reduce
    step of the embed job's duplicate-id pass, one part of the id shuffle (pipeline/id_shuffle.py) per task."""
    ids = pa.chunked_array([c for t in parts for c in t.column(0).chunks], pa.string())
    counts = pc.value_counts(ids.drop_null())
    return set(pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1)).to_pylist())


def id_bucket(ids: pa.Array, n_buckets: int) -> np.ndarray:
    """[n] int: which of `n_buckets` each string id falls in (`id_hash`: the same bucket in every process of
    one installation), for passes over the ids split across tasks."""
    return (id_hash(ids) % np.uint64(n_buckets)).astype(np.int64)


def content_hash(title: str | None, image: bytes | None) -> str:
    """Stable 32-hex-digit hash of (title, image bytes): length-prefixed, so no two rows collide by
    concatenation, and a missing image differs from zero bytes."""
    h = hashlib.blake2b(digest_size=16)
    t = (title or "").encode("utf-8")
    h.update(len(t).to_bytes(8, "little"))
    h.update(t)
    if image is None:
        h.update(b"\x00")
    else:
        h.update(b"\x01" + len(image).to_bytes(8, "little"))
        h.update(image)
    return h.hexdigest()


