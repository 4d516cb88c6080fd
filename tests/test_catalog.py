"""Catalog contract: column map parsing, schema validation before any work, the id pass, content hashes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline import id_shuffle
from pipeline.catalog import CatalogSchemaError, ColumnMap, content_hash, duplicate_ids, id_bucket, validate_schema
from pipeline.id_shuffle import id_parts


def _write(path, **columns) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_column_map_parse() -> None:
    cm = ColumnMap.parse("id=sku, title=name,image=photo")
    assert (cm.item_id, cm.title, cm.image, cm.image_uri) == ("sku", "name", "photo", "image_uri")
    assert ColumnMap.parse(None) == ColumnMap()
    with pytest.raises(ValueError, match="unknown"):
        ColumnMap.parse("colour=c")
    with pytest.raises(ValueError, match="KEY=COLUMN"):
        ColumnMap.parse("title")


def test_validate_schema_accepts_defaults_and_integer_ids(tmp_path) -> None:
    uri = _write(tmp_path / "c.parquet", item_id=pa.array([1, 2]), title=["a", "b"], image=pa.array([b"x", None]))
    schema, needed = validate_schema(uri, ColumnMap())
    assert needed == ["item_id", "title", "image"]
    assert pa.types.is_integer(schema.field("item_id").type)


def test_validate_schema_missing_column_names_it_and_the_fix(tmp_path) -> None:
    uri = _write(tmp_path / "c.parquet", item_id=["1"], name=["a"], image=pa.array([b"x"]))
    with pytest.raises(CatalogSchemaError, match=r"'title'.*missing.*\['item_id', 'name', 'image'\].*--column-map title=NAME"):
        validate_schema(uri, ColumnMap())
    _, needed = validate_schema(uri, ColumnMap.parse("title=name"))
    assert needed == ["item_id", "name", "image"]


def test_validate_schema_wrong_types(tmp_path) -> None:
    uri = _write(tmp_path / "a.parquet", item_id=["1"], title=["a"], image=["not bytes"])
    with pytest.raises(CatalogSchemaError, match=r"'image'.*type string.*binary"):
        validate_schema(uri, ColumnMap())
    uri = _write(tmp_path / "b.parquet", item_id=[1.5], title=["a"], image=pa.array([b"x"]))
    with pytest.raises(CatalogSchemaError, match=r"'item_id'.*string or integer"):
        validate_schema(uri, ColumnMap())
    uri = _write(tmp_path / "c.parquet", item_id=["1"], title=["a"])
    with pytest.raises(CatalogSchemaError, match="image=NAME or image_uri=NAME"):
        validate_schema(uri, ColumnMap())


def test_validate_schema_image_uri_catalog(tmp_path) -> None:
    uri = _write(tmp_path / "c.parquet", item_id=["1"], title=["a"], image_uri=["s3://b/k.jpg"])
    assert validate_schema(uri, ColumnMap())[1] == ["item_id", "title", "image_uri"]


def test_duplicate_ids_over_a_directory_in_one_part_or_several(tmp_path, ray_local, monkeypatch) -> None:
    (tmp_path / "cat").mkdir()
    _write(tmp_path / "cat" / "part-0.parquet", item_id=["a", "b", None], title=["", "", ""])
    _write(tmp_path / "cat" / "part-1.parquet", item_id=["b", "c", None], title=["", "", ""])
    uri = str(tmp_path / "cat")
    parts, rows = id_parts(uri, ["item_id"], "item_id")
    assert len(parts) == 1 and len(parts[0]) == 1 and rows == 6
    assert duplicate_ids(*ray.get(parts[0])) == {"b"}  # nulls are not duplicates of each other: they are null_id rejects
    # shuffled by a hash of the id over 3 parts, from 2 map tasks (one file each), as a big catalog runs:
    # every id in exactly one part, both rows of "b" in the same one
    monkeypatch.setattr(id_shuffle, "ID_BUCKET_ROWS", 3)
    parts, rows = id_parts(uri, ["item_id"], "item_id", 3)
    assert rows == 6 and [len(p) for p in parts] == [2, 2, 2]
    found = [pa.concat_tables(ray.get(p)).column(0).to_pylist() for p in parts]
    assert sorted(i for f in found for i in f) == ["a", "b", "b", "c"]
    assert sum("b" in f for f in found) == 1 and set().union(*(duplicate_ids(*ray.get(p)) for p in parts)) == {"b"}
    ids = pa.array([f"id-{i}" for i in range(1000)])
    buckets = id_bucket(ids, 3)
    assert set(buckets.tolist()) == {0, 1, 2}
    # the tasks of one pass run in other processes: the bucket of an id must not depend on the process
    other = subprocess.run([sys.executable, "-c", "import pyarrow as pa; from pipeline.catalog import id_bucket; "
                            "print(id_bucket(pa.array([f'id-{i}' for i in range(1000)]), 3).tolist())"],
                           check=True, capture_output=True, text=True).stdout
    assert other.strip() == str(buckets.tolist())
    assert min(np.bincount(buckets)) > 250  # spread evenly enough to split the work


def test_content_hash_is_stable_and_separates_fields() -> None:
    assert content_hash("red mug", b"\xff\xd8") == content_hash("red mug", b"\xff\xd8")
    assert len(content_hash("a", None)) == 32
    assert content_hash("ab", b"c") != content_hash("a", b"bc")  # no collision by concatenation
    assert content_hash("a", None) != content_hash("a", b"")  # missing image differs from zero bytes
    assert content_hash(None, None) == content_hash("", None)  # null title is the empty title


@pytest.mark.parametrize("bits", [64, 6])
def test_the_label_index_answers_as_read_labels_does_for_every_id(tmp_path, bits):
    """Two files of integer ids with a null and repeats (the first occurrence's labels win), null
    categories and a true_category; with 6-bit hashes nearly every id shares its hash and is kept exactly."""
    from pipeline.catalog import NO_LABEL, NOT_IN_CATALOG, read_label_index, read_labels

    rng = np.random.default_rng(0)
    (tmp_path / "cat").mkdir()
    for f in range(2):
        ids = rng.integers(0, 300, 200).tolist() + [None]
        cats = [None if rng.random() < 0.2 else f"c{rng.integers(5)}" for _ in ids]
        truth = [c or f"c{rng.integers(5)}" for c in cats]
        pq.write_table(pa.table({"sku": pa.array(ids, pa.int64()), "category": cats, "true_category": truth}),
                       tmp_path / "cat" / f"part-{f}.parquet", row_group_size=64)
    uri = str(tmp_path / "cat")
    columns = ColumnMap.parse("id=sku")
    index, labels = read_label_index(uri, columns, bits=bits), read_labels(uri, columns)
    codes = index.lookup(labels["item_id"].to_numpy(dtype=object))
    names = [[None if c == NO_LABEL else index.classes[c] for c in column] for column in codes.T]
    assert names[0] == [None if v is None or v != v else v for v in labels["category"]]
    assert names[1] == labels["true_category"].tolist()
    assert len(index.hashes) + len(index.exact) == len(labels)
    assert (len(index.exact) > 100) == (bits == 6)
    assert (index.lookup(np.array([None], dtype=object)) == NOT_IN_CATALOG).all()
    if bits == 64:
        assert (index.lookup(np.array(["not-an-id"], dtype=object)) == NOT_IN_CATALOG).all()
