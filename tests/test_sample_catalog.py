"""Tests for the sample catalog generator and its `make-sample-catalog` command."""

import io
import os
from collections import defaultdict

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs.cli import main
from pipeline.sample_catalog import (
    CATEGORIES,
    DEFECTS,
    EXPECTED_OUTCOME,
    IMAGE_SIZES,
    SCHEMA,
    make_sample_catalog,
    write_sample_catalog,
)

N_ITEMS = 300


@pytest.fixture(scope="module")
def table():
    return make_sample_catalog(N_ITEMS, seed=7)


@pytest.fixture(scope="module")
def rows(table):
    return table.to_pylist()


def _decodes(data: bytes | None) -> bool:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, TypeError):
        return False
    return True


def _clean(rows):
    return [r for r in rows if r["defect"] is None]


def test_same_seed_same_table_other_seed_other_table(table):
    assert make_sample_catalog(N_ITEMS, seed=7).equals(table)
    assert not make_sample_catalog(N_ITEMS, seed=8).equals(table)


def test_same_seed_gives_byte_identical_parquet(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_sample_catalog(str(a), 120, seed=1)
    write_sample_catalog(str(b), 120, seed=1)
    assert a.read_bytes() == b.read_bytes()


def test_schema_and_size(table):
    assert table.schema == SCHEMA
    assert table.num_rows == N_ITEMS
    assert make_sample_catalog(0, seed=0).num_rows == 0
    assert make_sample_catalog(7, seed=0).num_rows == 7


def test_categories_and_backfill_targets(rows):
    assert {r["true_category"] for r in rows} <= set(CATEGORIES)
    assert len({r["true_category"] for r in rows}) >= 10
    hidden = [r for r in rows if r["category"] is None]
    assert 0.05 * N_ITEMS <= len(hidden) <= 0.15 * N_ITEMS
    assert all(r["category"] in (None, r["true_category"]) for r in rows)


def test_every_defect_kind_is_present_and_as_described(rows):
    by_kind = defaultdict(list)
    for r in rows:
        by_kind[r["defect"]].append(r)
    assert set(DEFECTS) <= set(by_kind)
    assert set(EXPECTED_OUTCOME) == set(DEFECTS)
    clean_ids = [r["item_id"] for r in rows if r["defect"] is None]
    for r in by_kind["corrupt_image"] + by_kind["truncated_image"]:
        assert r["title"] and r["image"] and not _decodes(r["image"])
    assert all(r["item_id"] is None for r in by_kind["null_id"])
    assert all(r["title"] == "" and r["image"] is None for r in by_kind["no_content"])
    assert all(r["item_id"] in clean_ids for r in by_kind["duplicate_id"])
    assert all(r["title"] and r["image"] is None for r in by_kind["no_image"])
    assert all(r["title"] == "" and _decodes(r["image"]) for r in by_kind["no_title"])


def test_clean_rows_have_unique_ids_titles_and_decodable_images(rows):
    clean = _clean(rows)
    assert len({r["item_id"] for r in clean}) == len(clean)
    for r in clean:
        assert r["title"]
        img = Image.open(io.BytesIO(r["image"]))
        img.load()
        assert img.format == "JPEG" and img.size[0] in IMAGE_SIZES


def test_products_are_relisted_by_different_sellers(rows):
    sellers = defaultdict(list)
    for r in rows:
        sellers[r["group_id"]].append(r["seller"])
    multi = [s for s in sellers.values() if len(s) > 1]
    assert len(multi) >= 20
    assert all(len(set(s)) == len(s) and len(s) <= 4 for s in sellers.values())


def test_title_only_hard_case_shares_photo_bytes_across_groups(rows):
    by_photo = defaultdict(list)
    for r in _clean(rows):
        by_photo[r["image"]].append(r)
    twins = [rs for rs in by_photo.values() if len({r["group_id"] for r in rs}) > 1]
    assert twins
    for rs in twins:
        assert len({r["title"] for r in rs}) > 1


def test_image_only_hard_case_shares_title_words_across_groups(rows):
    by_words = defaultdict(list)
    for r in _clean(rows):
        by_words[tuple(r["title"].lower().split())].append(r)
    twins = [rs for rs in by_words.values() if len({r["group_id"] for r in rs}) > 1]
    assert twins
    for rs in twins:
        assert len({r["image"] for r in rs}) > 1


def test_write_single_file_and_part_directory(tmp_path):
    single = tmp_path / "one.parquet"
    table = write_sample_catalog(str(single), 60, seed=2)
    assert pq.read_table(single).equals(table)
    parts = tmp_path / "parts"
    write_sample_catalog(str(parts), 60, seed=2, rows_per_file=25)
    assert sorted(os.listdir(parts)) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert pq.read_table(parts).equals(table)
    with pytest.raises(FileExistsError, match="already exists"):
        write_sample_catalog(str(single), 60, seed=2)


def test_cli_writes_a_readable_catalog(tmp_path):
    out = tmp_path / "catalog.parquet"
    result = CliRunner().invoke(main, ["make-sample-catalog", str(out), "--items", "60", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and "60 rows" in result.output
    assert pq.read_table(out).num_rows == 60
    again = CliRunner().invoke(main, ["make-sample-catalog", str(out), "--items", "60"])
    assert again.exit_code != 0 and "already exists" in again.output


def test_every_command_has_help():
    runner = CliRunner()
    assert runner.invoke(main, ["--help"]).exit_code == 0
    for name in main.commands:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Example" in result.output, name
