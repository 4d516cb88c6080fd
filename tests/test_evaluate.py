"""Tests for the evaluation library and the `evaluate` command: metrics on oracles, baselines, report, CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from item_model import ItemModel, ItemProcessor, preset_config, save_model_dir, train_tokenizer
from jobs.cli import main
from pipeline.eval_report import PLOTS, write_report
from pipeline.eval_embedders import model_embedder, phash_embedder, tfidf_embedder
from pipeline.eval_metrics import esp_natural, esp_relisting, knn_vote_loo, linear_probe, macro_f1, modality_movement
from pipeline.evaluate import EvalOptions, blank_inputs, evaluate, limit_rows, make_relistings, read_catalog
from pipeline.perturb import RelistConfig
from pipeline.sample_catalog import make_sample_catalog

N_ITEMS = 300
N_RELIST = 40


@pytest.fixture(scope="module")
def table():
    return make_sample_catalog(N_ITEMS, seed=7)


@pytest.fixture(scope="module")
def columns(table):
    return {name: table.column(name).to_pylist() for name in ("title", "image", "group_id", "true_category")}


@pytest.fixture(scope="module")
def catalog_path(table, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("catalog") / "catalog.parquet")
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(columns, tmp_path_factory):
    tok = train_tokenizer(columns["title"], vocab_size=200)
    model = ItemModel(preset_config("tiny", tok))
    processor = ItemProcessor(tok, model.config.image_size, model.config.max_title_len)
    directory = str(tmp_path_factory.mktemp("model"))
    save_model_dir(model, processor, directory)
    return directory


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _one_hot_plus_noise(values: list, seed: int = 0) -> np.ndarray:
    codes = np.unique(np.array(values, dtype=object).astype(str), return_inverse=True)[1]
    noise = np.random.default_rng(seed).normal(0.0, 1e-3, size=(len(values), codes.max() + 1))
    return _unit_rows(np.eye(codes.max() + 1)[codes] + noise)


# --- duplicate search ------------------------------------------------------------------------------


def test_group_oracle_scores_perfect_natural_search(columns):
    result = esp_natural(_one_hot_plus_noise(columns["group_id"]), columns["group_id"])
    sizes = {g: columns["group_id"].count(g) for g in columns["group_id"]}
    assert result["n_queries"] == sum(1 for g in columns["group_id"] if sizes[g] >= 2)
    assert result["recall@1"] == 1.0 and result["recall@10"] == 1.0 and result["map@10"] == 1.0


def test_random_embedding_scores_near_chance(columns):
    emb = _unit_rows(np.random.default_rng(1).normal(size=(N_ITEMS, 32)))
    result = esp_natural(emb, columns["group_id"])
    # chance recall@10 is about 10 * (mean group size - 1) / N, a few percent here
    assert result["recall@1"] < 0.05 and result["recall@10"] < 0.2


def test_identical_vectors_find_each_other_not_themselves():
    # byte-identical photos embed identically: each query ties with its own gallery row
    emb = _unit_rows(np.array([[1.0, 0.0], [1.0, 0.0], [0.9, 0.4], [0.0, 1.0]]))
    result = esp_natural(emb, ["a", "a", None, None])
    assert result["n_queries"] == 2
    assert result["recall@1"] == 1.0 and result["map@10"] == 1.0


def test_zero_queries_answer_nothing():
    gallery = _unit_rows(np.eye(4))
    queries = np.zeros((2, 4), dtype=np.float32)
    result = esp_relisting(gallery, queries, np.array([0, 1]))
    assert result["recall@10"] == 0.0


def test_relisting_hit_counts_the_originals_group():
    gallery = _unit_rows(np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]))
    query = _unit_rows(np.array([[1.0, 0.02]]))  # nearest is row 1, a listing of the original's product
    assert esp_relisting(gallery, query, np.array([0]))["recall@1"] == 0.0
    assert esp_relisting(gallery, query, np.array([0]), group_ids=["p", "p", None])["recall@1"] == 1.0


# --- category prediction ---------------------------------------------------------------------------


def test_knn_vote_on_label_oracle_is_exact(columns):
    labels = columns["true_category"]
    result = knn_vote_loo(_one_hot_plus_noise(labels), labels, k=10)
    assert result["accuracy"] == 1.0 and result["macro_f1"] == 1.0
    assert result["n_queries"] == N_ITEMS and min(result["confidence"]) > 0.99


def test_knn_vote_skips_unlabelled_rows(columns):
    labels = [y if i % 3 else None for i, y in enumerate(columns["true_category"])]
    result = knn_vote_loo(_one_hot_plus_noise(columns["true_category"]), labels, k=5, max_queries=50)
    assert result["n_queries"] == 50 and result["accuracy"] == 1.0


def test_linear_probe_separates_label_oracle_and_is_deterministic(columns):
    labels = columns["true_category"]
    emb = _one_hot_plus_noise(labels)
    first = linear_probe(emb, labels, seed=3)
    assert first["accuracy"] == 1.0 and first["n_test"] == round(0.2 * N_ITEMS)
    assert linear_probe(emb, labels, seed=3) == first
    noise = _unit_rows(np.random.default_rng(0).normal(size=(N_ITEMS, 16)))
    assert linear_probe(noise, labels, seed=3)["accuracy"] < 0.5


def test_macro_f1_by_hand():
    # F1 = 2TP / (2TP + FP + FN). a: tp 1, fp 0, fn 1 -> 2/3; b: tp 1, fp 1, fn 1 -> 1/2; c: predicted only -> 0
    assert macro_f1(["a", "a", "b", "b"], ["a", "b", "b", "c"]) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


# --- modality blanking -----------------------------------------------------------------------------


def test_blank_inputs_changes_exactly_one_modality(columns):
    titles, images = columns["title"], columns["image"]
    blank_t, same_i = blank_inputs(titles, images, "title")
    assert blank_t == [""] * len(titles) and same_i == images
    same_t, blank_i = blank_inputs(titles, images, "image")
    assert same_t == titles and blank_i == [None] * len(images)
    with pytest.raises(ValueError, match="title' or 'image"):
        blank_inputs(titles, images, "both")


def test_modality_movement_of_single_modality_embedders(columns):
    titles, images = columns["title"], columns["image"]
    both = np.array([bool(t) and i is not None for t, i in zip(titles, images)])
    embed = tfidf_embedder(titles)
    moved = modality_movement(embed(titles, images), embed(*blank_inputs(titles, images, "title")),
                              embed(*blank_inputs(titles, images, "image")), both)
    assert moved == {"title_movement": pytest.approx(1.0), "image_movement": pytest.approx(0.0), "image_share": 0.0}


# --- re-listings and baselines ---------------------------------------------------------------------


def test_relistings_are_seeded_and_paired_across_families(table):
    titles, images, originals = make_relistings(table, N_RELIST, 5, RelistConfig(), ("title",))
    again = make_relistings(table, N_RELIST, 5, RelistConfig(), ("title",))
    assert (titles, images) == (again[0], again[1]) and (originals == again[2]).all()
    assert (make_relistings(table, N_RELIST, 5, RelistConfig(), ("image",))[2] == originals).all()
    source = table.column("title").to_pylist()
    assert sum(t != source[i] for t, i in zip(titles, originals)) >= N_RELIST - 2


def test_tfidf_finds_retitled_listings(table, columns):
    titles, images, originals = make_relistings(table, N_RELIST, 0, RelistConfig(), ("title",))
    embed = tfidf_embedder(columns["title"])
    result = esp_relisting(embed(columns["title"], columns["image"]), embed(titles, images), originals)
    assert result["recall@1"] >= 0.6 and result["recall@10"] >= 0.9  # chance is ~1/300 and ~10/300


def test_phash_finds_reencoded_images(table, columns):
    titles, images, originals = make_relistings(table, N_RELIST, 0, RelistConfig(), ("jpeg",))
    embed = phash_embedder()
    gallery, queries = embed(columns["title"], columns["image"]), embed(titles, images)
    assert esp_relisting(gallery, queries, originals)["recall@10"] == 1.0
    # rank 1 can lose a tie: other products' photos (twins drawn in one silhouette) share the 64-bit hash;
    # what must hold is that the original is (almost) always among the best-scoring rows
    scores = queries @ gallery.T
    assert np.mean(scores[np.arange(len(originals)), originals] >= scores.max(axis=1) - 1e-6) >= 0.95


# --- catalog reading -------------------------------------------------------------------------------


def test_limit_rows_keeps_groups_whole(table, columns):
    small = limit_rows(table, 100, "group_id", seed=0)
    assert 100 <= small.num_rows < 100 + 4  # the last group may overshoot by its size - 1
    kept = small.column("group_id").to_pylist()
    assert all(kept.count(g) == columns["group_id"].count(g) for g in set(kept))


def test_read_catalog_names_the_missing_column_and_option(catalog_path):
    with pytest.raises(ValueError, match=r"'dup_group' \(group-col\)"):
        read_catalog(catalog_path, EvalOptions(group_col="dup_group"))


# --- the whole comparison --------------------------------------------------------------------------


def test_evaluate_and_report_on_baselines(table, columns, tmp_path):
    options = EvalOptions(relistings=20, knn_max_queries=100)
    results = evaluate(table, {"tfidf": tfidf_embedder(columns["title"]), "phash": phash_embedder()}, options)
    tfidf, phash = results.models
    assert set(tfidf.metrics) == {"full", "title_blank", "image_blank"}
    # each reference uses one modality: blanking it ruins search, blanking the other changes nothing
    assert tfidf.metrics["title_blank"]["natural_recall@1"] == 0.0
    assert tfidf.metrics["image_blank"] == {k: v for k, v in tfidf.metrics["full"].items() if not k.startswith("n_")}
    assert phash.metrics["image_blank"]["knn_accuracy"] == 0.0
    assert len(tfidf.recall_curves["natural"]) == 10 and np.all(np.diff(tfidf.recall_curves["natural"]) >= 0)
    report = write_report(results, str(tmp_path / "report"))
    text = open(report).read()
    assert "| tfidf |" in text and "| phash |" in text and "image share" in text
    for plot in PLOTS:
        assert os.path.getsize(tmp_path / "report" / plot) > 1000
    assert json.load(open(tmp_path / "report" / "results.json"))["info"]["n_rows"] == N_ITEMS


def test_model_embedder_gives_unit_rows_and_handles_missing_modalities(columns, tiny_model_dir):
    embed = model_embedder(tiny_model_dir, batch_size=16)
    titles, images = columns["title"][:40], columns["image"][:40]
    emb = embed(titles, images)
    assert emb.shape == (40, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(emb, embed(titles[:7], images[:7]).tolist() + emb[7:].tolist(), atol=1e-5)
    assert np.isfinite(embed(*blank_inputs(titles, images, "image"))).all()


# --- CLI -------------------------------------------------------------------------------------------


def test_cli_evaluates_baselines_end_to_end(catalog_path, tmp_path):
    out = str(tmp_path / "report")
    result = CliRunner().invoke(main, ["evaluate", catalog_path, out, "--relistings", "10", "--knn-queries", "50"])
    assert result.exit_code == 0, result.output
    assert "| tfidf |" in result.output and "report.md" in result.output
    assert sorted(os.listdir(out)) == sorted(["report.md", "results.json", *PLOTS])
    again = CliRunner().invoke(main, ["evaluate", catalog_path, out, "--relistings", "10"])
    assert again.exit_code != 0 and "already exists" in again.output


def test_cli_evaluates_a_model_dir(catalog_path, tiny_model_dir, tmp_path):
    out = str(tmp_path / "report")
    result = CliRunner().invoke(main, [
        "evaluate", catalog_path, out, "--models", f"tiny={tiny_model_dir}", "--baselines", "",
        "--relistings", "10", "--limit", "120", "--knn-queries", "50",
    ])
    assert result.exit_code == 0, result.output
    assert "| tiny |" in result.output and "| tfidf |" not in result.output
    assert "tiny" in open(os.path.join(out, "report.md")).read()


@pytest.mark.parametrize("args, message", [
    (["--models", "no-equals-sign"], "NAME=MODEL_DIR"),
    (["--baselines", "bm25"], "unknown baseline"),
    (["--baselines", ""], "nothing to evaluate"),
    (["--label-col", "articleType"], "'articleType' (label-col)"),
])
def test_cli_turns_bad_arguments_into_messages(catalog_path, tmp_path, args, message):
    result = CliRunner().invoke(main, ["evaluate", catalog_path, str(tmp_path / "r"), *args])
    assert result.exit_code != 0 and message in result.output
    assert not os.path.exists(tmp_path / "r")


def test_evaluate_command_has_help():
    result = CliRunner().invoke(main, ["evaluate", "--help"])
    assert result.exit_code == 0 and "Example" in result.output and "--group-col" in result.output


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU: --gpu would start the comparison")
def test_compare_models_gpu_without_a_gpu_fails_before_any_work(tmp_path):
    from bench.compare_models import main as compare

    with pytest.raises(SystemExit, match="--gpu: torch .* sees no CUDA device"):
        compare([str(tmp_path / "catalog.parquet"), "--out", str(tmp_path / "run"), "--gpu"])
    assert not (tmp_path / "run").exists()
