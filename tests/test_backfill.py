"""Category backfill: the vote, fills and abstentions on a generated index_catalog, leave-one-out curve, the CLI."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline import storage
from pipeline.backfill import backfill_categories, predict, run_backfill, vote
from pipeline.catalog import CatalogSchemaError
from pipeline.index import IndexShard, ShardedIndex
from jobs.cli import main


def test_vote_is_similarity_weighted_and_ignores_unlabelled():
    labels = np.array([[0, 1, 1, -1], [-1, -1, -1, -1]])
    scores = np.array([[0.9, 0.3, 0.3, 1.0], [0.9, 0.9, 0.9, 0.9]])
    winner, confidence, n = vote(labels, scores, n_classes=2)
    assert winner.tolist() == [0, -1]  # 0.9 outweighs 0.3 + 0.3; the unlabelled 1.0 does not count
    np.testing.assert_allclose(confidence, [0.9 / 1.5, 0.0])
    assert n.tolist() == [3, 0]


def test_predict_never_uses_the_items_own_label():
    vectors = np.eye(4, dtype=np.float32)[[0, 0, 1, 1]] + np.float32(0.01) * np.eye(4, dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(4)
    flat.add(vectors)
    ids = np.array(["a1", "a2", "b1", "b2"], dtype=object)
    index = ShardedIndex([IndexShard("shard-00000.faiss", flat, ids)], dim=4)
    labels = pd.Series(["x", "y", "z", None], index=ids)  # each item's own label differs from its twin's
    pred, confidence, n = predict(index, ids, vectors, labels, k=1)
    assert pred.tolist() == ["y", "x", None, "z"] and n.tolist() == [1, 1, 0, 1]


@pytest.fixture(scope="module")
def labelled_catalog(index_catalog) -> pd.DataFrame:
    """The generated catalog with a random tenth of its categories hidden (true_category kept aside)."""
    hidden = np.random.default_rng(1).random(len(index_catalog.item_ids)) < 0.1
    return pd.DataFrame(
        {"item_id": index_catalog.item_ids, "category": np.where(hidden, None, index_catalog.category), "true_category": index_catalog.category}
    )


def test_backfill_fills_mostly_correctly_and_abstains_when_unsure(ivf_index_uri, embeddings_uri, labelled_catalog, index_catalog):
    rows, report = backfill_categories(ivf_index_uri, embeddings_uri, labelled_catalog, k=10, min_confidence=0.6)
    hidden = labelled_catalog.loc[labelled_catalog["category"].isna(), "item_id"]
    assert set(rows["item_id"]) == set(hidden) and report["n_unlabelled"] == len(hidden)
    assert report["n_filled"] + report["n_unfilled"] == len(hidden) and report["n_no_embedding"] == 0
    truth = dict(zip(index_catalog.item_ids, index_catalog.category))
    filled = rows.dropna(subset=["predicted_category"])
    assert (filled["predicted_category"] == filled["item_id"].map(truth)).mean() >= 0.95
    assert report["fill_accuracy"] >= 0.95
    # it abstains, and only where the item sits between two categories
    unfilled = rows[rows["predicted_category"].isna()]
    ambiguous = dict(zip(index_catalog.item_ids, index_catalog.ambiguous))
    assert len(unfilled) >= 3 and unfilled["item_id"].map(ambiguous).mean() >= 0.8
    assert (unfilled["confidence"] < 0.6).all() and (filled["confidence"] >= 0.6).all()


def test_leave_one_out_precision_rises_as_coverage_falls(ivf_index_uri, embeddings_uri, labelled_catalog):
    _, report = backfill_categories(ivf_index_uri, embeddings_uri, labelled_catalog, k=10, eval_sample=1000)
    loo = report["leave_one_out"]
    assert loo["n"] == 1000 and loo["accuracy"] >= 0.9
    coverage = [p["coverage"] for p in loo["curve"]]
    assert coverage[0] == 1.0 and coverage == sorted(coverage, reverse=True)
    at_09 = next(p for p in loo["curve"] if p["threshold"] == 0.9)
    assert at_09["precision"] > loo["accuracy"] and at_09["coverage"] < 1.0


def test_backfill_cli_publishes_rows_report_and_plot(tmp_path, ivf_index_uri, embeddings_uri, labelled_catalog):
    catalog_path = tmp_path / "index_catalog.parquet"
    labelled_catalog.to_parquet(catalog_path)
    out = str(tmp_path / "backfill")
    args = ["backfill-categories", ivf_index_uri, embeddings_uri, str(catalog_path), out, "--min-confidence", "0.7", "--plot"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "leave-one-out" in result.output and "threshold\tcoverage\tprecision" in result.output
    manifest = storage.read_manifest(out)
    table = pq.read_table(storage.parquet_files(out))
    assert table.schema.names == ["item_id", "predicted_category", "confidence", "n_neighbors"]
    assert manifest["n_filled"] == table.column("predicted_category").drop_null().length()
    assert (tmp_path / "backfill" / "precision_coverage.png").stat().st_size > 1000

    result = CliRunner().invoke(main, ["backfill-categories", ivf_index_uri, embeddings_uri, str(catalog_path), out])
    assert result.exit_code == 1 and "already published" in result.output


def test_the_backfill_job_runs_in_a_task_and_publishes_what_the_function_predicts(
        tmp_path, ray_local, ivf_index_uri, embeddings_uri, labelled_catalog):
    catalog_path = str(tmp_path / "catalog.parquet")
    labelled_catalog.to_parquet(catalog_path)
    out = str(tmp_path / "backfill")
    manifest = run_backfill(ivf_index_uri, embeddings_uri, catalog_path, out, k=10, min_confidence=0.6, eval_sample=0)
    rows, report = backfill_categories(ivf_index_uri, embeddings_uri, labelled_catalog, k=10, min_confidence=0.6, eval_sample=0)
    published = pq.read_table(storage.parquet_files(out)).to_pandas().sort_values("item_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(published, rows.sort_values("item_id").reset_index(drop=True))
    assert (manifest["n_filled"], manifest["n_unfilled"]) == (report["n_filled"], report["n_unfilled"])
    # a catalog without its category column fails in the driver, before the task, naming the fix
    labelled_catalog.drop(columns=["category"]).to_parquet(tmp_path / "no-category.parquet")
    with pytest.raises(CatalogSchemaError, match="category=NAME"):
        run_backfill(ivf_index_uri, embeddings_uri, str(tmp_path / "no-category.parquet"), str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other")
