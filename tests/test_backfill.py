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
from pipeline.backfill import predict, run_backfill, vote
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
    classes = np.array(["x", "y", "z"], dtype=object)
    code_of = {"a1": 0, "a2": 1, "b1": 2, "b2": -1}  # each item's own label differs from its twin's; b2 has none
    scores, found = index.search(vectors, 2)  # k + 1: each item finds itself
    codes = np.vectorize(code_of.get)(found)
    pred, confidence, n = predict(ids, scores, found, codes, classes, k=1)
    assert pred.tolist() == ["y", "x", None, "z"] and n.tolist() == [1, 1, 0, 1]


@pytest.fixture(scope="module")
def labelled_catalog(index_catalog) -> pd.DataFrame:
    """The generated catalog with a random tenth of its categories hidden (true_category kept aside)."""
    hidden = np.random.default_rng(1).random(len(index_catalog.item_ids)) < 0.1
    return pd.DataFrame(
        {"item_id": index_catalog.item_ids, "category": np.where(hidden, None, index_catalog.category), "true_category": index_catalog.category}
    )


@pytest.fixture(scope="module")
def catalog_path(tmp_path_factory, labelled_catalog) -> str:
    path = str(tmp_path_factory.mktemp("backfill") / "catalog.parquet")
    labelled_catalog.to_parquet(path)
    return path


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory, ray_local, ivf_index_uri, embeddings_uri, catalog_path) -> tuple[pd.DataFrame, dict]:
    """One backfill job over the 3-shard IVF index, in small batches (many parts, many votes): (rows, manifest)."""
    out = str(tmp_path_factory.mktemp("backfill") / "out")
    manifest = run_backfill(ivf_index_uri, embeddings_uri, catalog_path, out, k=10, min_confidence=0.6, eval_sample=1000,
                            batch_size=400)
    return pq.read_table(storage.parquet_files(out)).to_pandas(), manifest


def test_backfill_fills_mostly_correctly_and_abstains_when_unsure(backfilled, labelled_catalog, index_catalog):
    rows, report = backfilled
    hidden = labelled_catalog.loc[labelled_catalog["category"].isna(), "item_id"]
    assert sorted(rows["item_id"]) == sorted(hidden) and report["n_unlabelled"] == len(hidden)
    assert report["n_filled"] + report["n_unfilled"] == len(hidden) and report["n_no_embedding"] == 0
    truth = dict(zip(index_catalog.item_ids, index_catalog.category))
    filled = rows.dropna(subset=["predicted_category"])
    assert report["n_filled"] == len(filled)
    accuracy = (filled["predicted_category"] == filled["item_id"].map(truth)).mean()
    assert accuracy >= 0.95 and report["fill_accuracy"] == pytest.approx(accuracy)
    # it abstains, and only where the item sits between two categories
    unfilled = rows[rows["predicted_category"].isna()]
    ambiguous = dict(zip(index_catalog.item_ids, index_catalog.ambiguous))
    assert len(unfilled) >= 3 and unfilled["item_id"].map(ambiguous).mean() >= 0.8
    assert (unfilled["confidence"] < 0.6).all() and (filled["confidence"] >= 0.6).all()


def test_the_job_publishes_what_a_vote_over_the_whole_index_gives(backfilled, ivf_index_uri, labelled_catalog,
                                                                  index_catalog):
    """The job's stages (one shard each, batches of 400) give the rows an in-process vote over the whole
    index gives."""
    rows, _ = backfilled
    hidden = labelled_catalog["category"].isna().to_numpy()
    ids, vectors = np.asarray(index_catalog.item_ids, dtype=object)[hidden], index_catalog.vectors[hidden]
    scores, found = ShardedIndex.load(ivf_index_uri).search(vectors, 11)
    codes, classes = pd.factorize(labelled_catalog["category"])  # -1 where null
    code_of = dict(zip(labelled_catalog["item_id"], codes))
    pred, conf, n = predict(ids, scores, found, np.vectorize(code_of.get)(found), classes, 10)
    expected = pd.DataFrame({"item_id": ids, "predicted_category": np.where(conf >= 0.6, pred, None),
                             "confidence": conf.astype(np.float32), "n_neighbors": n.astype(np.int32)})
    got = rows.sort_values("item_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected.sort_values("item_id").reset_index(drop=True))


def test_leave_one_out_precision_rises_as_coverage_falls(backfilled):
    loo = backfilled[1]["leave_one_out"]
    assert loo["n"] == 1000 and loo["accuracy"] >= 0.9
    coverage = [p["coverage"] for p in loo["curve"]]
    assert coverage[0] == 1.0 and coverage == sorted(coverage, reverse=True)
    at_09 = next(p for p in loo["curve"] if p["threshold"] == 0.9)
    assert at_09["precision"] > loo["accuracy"] and at_09["coverage"] < 1.0


def test_backfill_cli_publishes_rows_report_and_plot(tmp_path, ivf_index_uri, embeddings_uri, catalog_path):
    out = str(tmp_path / "backfill")
    args = ["backfill-categories", ivf_index_uri, embeddings_uri, catalog_path, out, "--min-confidence", "0.7", "--plot"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "leave-one-out" in result.output and "threshold\tcoverage\tprecision" in result.output
    manifest = storage.read_manifest(out)
    table = pq.read_table(storage.parquet_files(out))
    assert table.schema.names == ["item_id", "predicted_category", "confidence", "n_neighbors"]
    assert manifest["n_filled"] == table.column("predicted_category").drop_null().length()
    assert (tmp_path / "backfill" / "precision_coverage.png").stat().st_size > 1000

    result = CliRunner().invoke(main, ["backfill-categories", ivf_index_uri, embeddings_uri, catalog_path, out])
    assert result.exit_code == 1 and "already published" in result.output


def test_a_killed_vote_actor_is_restarted_and_no_row_is_lost_or_written_twice(
        tmp_path, backfilled, ivf_index_uri, embeddings_uri, catalog_path, monkeypatch):
    from pipeline import backfill
    from tests.faults import killed_once

    marker = str(tmp_path / "killed")
    monkeypatch.setattr(backfill, "BackfillVote", killed_once(backfill.BackfillVote, marker, at_call=2))
    out = str(tmp_path / "backfill")
    manifest = run_backfill(ivf_index_uri, embeddings_uri, catalog_path, out, k=10, min_confidence=0.6, eval_sample=1000,
                            batch_size=400)
    assert os.path.exists(marker)
    rows = pq.read_table(storage.parquet_files(out)).to_pandas()
    pd.testing.assert_frame_equal(rows.sort_values("item_id").reset_index(drop=True),
                                  backfilled[0].sort_values("item_id").reset_index(drop=True))
    assert {k: manifest[k] for k in ("n_filled", "n_unfilled", "leave_one_out")} == \
           {k: backfilled[1][k] for k in ("n_filled", "n_unfilled", "leave_one_out")}


def test_a_catalog_without_its_category_column_fails_before_any_work(tmp_path, ray_local, ivf_index_uri, embeddings_uri,
                                                                      labelled_catalog):
    labelled_catalog.drop(columns=["category"]).to_parquet(tmp_path / "no-category.parquet")
    with pytest.raises(CatalogSchemaError, match="category=NAME"):
        run_backfill(ivf_index_uri, embeddings_uri, str(tmp_path / "no-category.parquet"), str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other")


def test_unlabelled_rows_without_an_embedding_are_counted_when_nothing_is_left_to_fill(
        tmp_path, ray_local, ivf_index_uri, embeddings_uri, labelled_catalog):
    """Every embedded row labelled, two uncategorised rows the table lacks, no leave-one-out: no batch reaches
    the vote, the report still counts the two, and the output is one empty part with the schema."""
    catalog = pd.concat([labelled_catalog.assign(category=labelled_catalog["true_category"]),
                         pd.DataFrame({"item_id": ["new-1", "new-2"], "category": [None, None], "true_category": ["a", "b"]})])
    path = str(tmp_path / "catalog.parquet")
    catalog.to_parquet(path)
    out = str(tmp_path / "backfill")
    manifest = run_backfill(ivf_index_uri, embeddings_uri, path, out, eval_sample=0)
    assert (manifest["n_unlabelled"], manifest["n_no_embedding"], manifest["n_filled"], manifest["n_unfilled"]) == (2, 2, 0, 0)
    table = pq.read_table(storage.parquet_files(out))
    assert table.num_rows == 0 and table.schema.names == ["item_id", "predicted_category", "confidence", "n_neighbors"]
