"""Paths behave as a person expects: every command that takes a catalog accepts a .parquet file, a file
without the suffix, a directory, a directory with a trailing slash and an s3:// prefix; an output path
ending in / is a directory."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import main
from pipeline import storage
from pipeline.catalog import ColumnMap, open_dataset, read_labels, read_rows
from pipeline.sample_catalog import write_sample_catalog

ROWS = 60
FORMS = ["file.parquet", "file without suffix", "directory", "directory/", "s3://"]


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory, s3_env) -> dict[str, str]:
    """The same catalog in every form a person may give."""
    root = tmp_path_factory.mktemp("forms")
    write_sample_catalog(str(root / "catalog.parquet"), ROWS, seed=5)
    write_sample_catalog(str(root / "catalog"), ROWS, seed=5)
    write_sample_catalog(str(root / "catalog-dir") + "/", ROWS, seed=5, rows_per_file=25)
    fs, _ = storage.get_fs("s3://paths")
    fs.mkdir("paths")
    fs.put(str(root / "catalog-dir"), "paths/catalog", recursive=True)
    return {"file.parquet": str(root / "catalog.parquet"), "file without suffix": str(root / "catalog"),
            "directory": str(root / "catalog-dir"), "directory/": str(root / "catalog-dir") + "/",
            "s3://": "s3://paths/catalog/"}


def test_make_sample_catalog_writes_a_directory_for_a_trailing_slash_and_a_file_otherwise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["make-sample-catalog", "catalog/", "--items", "30"])
    assert result.exit_code == 0, result.output
    assert os.path.isdir("catalog") and sorted(os.listdir("catalog")) == ["part-00000.parquet"]
    result = runner.invoke(main, ["make-sample-catalog", "cat", "--items", "30"])
    assert result.exit_code == 0, result.output
    assert os.path.isfile("cat") and pq.read_metadata("cat").num_rows == 30
    result = runner.invoke(main, ["make-sample-catalog", "catalog/", "--items", "30"])
    assert result.exit_code != 0 and "already exists" in result.output


@pytest.mark.parametrize("form", FORMS)
def test_every_reader_takes_every_form(catalogs, form, tiny_model_dir, ray_local):
    """The one reader (catalog.open_dataset / read_rows) under embed, pretrain, evaluate, dedup, backfill."""
    from item_model import ItemProcessor
    from item_model.training import TrainConfig
    from pipeline.evaluate import EvalOptions, read_catalog
    from pipeline.pretrain import build_dataset

    uri = catalogs[form]
    assert open_dataset(uri).count_rows() == ROWS
    ids = pq.read_table(catalogs["file.parquet"], columns=["item_id"]).column("item_id").drop_null()
    assert len(read_labels(uri, ColumnMap())) == len(set(ids.to_pylist()))  # embed's id rule: one row per id
    assert read_catalog(uri, EvalOptions()).num_rows == ROWS
    assert read_rows(uri, ["item_id", "title"]).count() == ROWS  # embed's and pretrain's Ray Data read
    build_dataset(uri, ItemProcessor.from_pretrained(tiny_model_dir), TrainConfig(preset="tiny"))  # pretrain: lists files here


# the .parquet file and the plain directory are the forms every other embed test uses
@pytest.mark.parametrize("form", ["file without suffix", "directory/", "s3://"])
def test_embed_command_takes_every_form_and_an_output_with_a_slash(catalogs, form, tiny_model_dir, tmp_path, ray_local):
    out = str(tmp_path / "embeddings") + "/"
    result = CliRunner().invoke(main, ["embed", catalogs[form], tiny_model_dir, out])
    assert result.exit_code == 0, result.output
    assert storage.read_manifest(out.rstrip("/"))["rows_in"] == ROWS
    assert not [p for p in os.listdir(tmp_path) if "staging" in p]


def test_evaluate_command_takes_an_s3_prefix_and_an_output_with_a_slash(catalogs, tmp_path):
    result = CliRunner().invoke(main, ["evaluate", catalogs["s3://"], str(tmp_path / "eval") + "/", "--baselines",
                                       "tfidf", "--relistings", "10", "--knn-queries", "20"])
    assert result.exit_code == 0, result.output
    assert os.path.isfile(tmp_path / "eval" / "report.md")
