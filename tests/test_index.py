"""Sharded index: spec choice, build, merged search, the recall gate and damaged index dirs."""

from __future__ import annotations

import os
import re
import shutil

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from jobs.cli import main
from pipeline import index_build, storage
from pipeline.embedding_scan import exact_neighbours_streamed
from pipeline.index import (
    IndexFilesError,
    RecallTooLowError,
    ShardByShard,
    ShardedIndex,
    choose_index_spec,
    shard_of,
    write_index,
)
from pipeline.index_build import IndexBuildConfig, build_index
from pipeline.index_tuning import measure_recall
from tests.index_data import write_embedding_table

GiB = 2**30


def test_choose_index_spec_follows_size_and_budget():
    assert choose_index_spec(5_000, 256, GiB) == "Flat"
    assert choose_index_spec(100_000, 256, GiB) == "HNSW32"
    assert choose_index_spec(1_000_000, 256, 2 * GiB) == "IVF4096,Flat"
    assert choose_index_spec(1_000_000, 256, GiB // 2) == "IVF4096,SQ8"
    assert choose_index_spec(1_000_000, 256, GiB // 8) == "IVF4096,PQ128x4fs,RFlat"
    with pytest.raises(ValueError, match="--memory-budget"):
        choose_index_spec(1_000_000, 256, GiB // 64)


def test_shard_assignment_is_stable_and_spread():
    ids = [f"item-{i}" for i in range(4000)]
    shards = shard_of(ids, 4)
    assert shard_of(["item-0", "item-1"], 4).tolist() == shards[:2].tolist()
    assert shard_of(["abc"], 7).tolist() == [891568578 % 7]  # crc32("abc"): independent of the process
    assert np.bincount(shards, minlength=4).min() > 800


def test_each_item_is_its_own_nearest_neighbour(ivf_index_uri, index_catalog):
    index = ShardedIndex.load(ivf_index_uri)
    assert index.ntotal == len(index_catalog.item_ids)
    scores, found = index.search(index_catalog.vectors, 1)
    assert (found[:, 0] == index_catalog.item_ids).all()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-4)


def test_searching_one_shard_at_a_time_equals_the_loaded_index(ivf_index_uri, index_catalog):
    queries = index_catalog.vectors[::7]
    scores, found = ShardedIndex.load(ivf_index_uri).search(queries, 8)
    one_scores, one_found = ShardByShard.load(ivf_index_uri).search(queries, 8)
    np.testing.assert_array_equal(one_found, found)
    np.testing.assert_allclose(one_scores, scores, rtol=1e-6)


def test_manifest_records_spec_recall_and_shards(ivf_index_uri, index_catalog):
    m = storage.read_manifest(ivf_index_uri)
    assert m["metric"] == "inner_product" and m["dim"] == 32 and m["model_version"] == "test-model-v1"
    assert m["spec"] == "IVF64,Flat" and len(m["shards"]) == 3
    assert sum(s["n_vectors"] for s in m["shards"]) == len(index_catalog.item_ids)
    assert m["n_queries"] == 300
    assert 1 <= m["search_params"]["nprobe"] <= 64
    assert all(os.path.exists(os.path.join(ivf_index_uri, s["faiss"])) for s in m["shards"])


def _real_neighbour_recall(index: ShardedIndex, vectors: np.ndarray, ids: np.ndarray, k: int = 10) -> float:
    """Recall@k of `index` over every item as a query, its own id left out, against a numpy exact search."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)  # self is not a neighbour
    truth = ids[np.argsort(-sims, axis=1, kind="stable")[:, :k]]
    _, found = index.search(vectors, k + 1)
    hits = [len(set([f for f in row if f != own][:k]) & set(t)) for row, own, t in zip(found.tolist(), ids.tolist(), truth.tolist())]
    return sum(hits) / (k * len(ids))


def test_recorded_recall_is_measured_on_real_neighbours(ivf_index_uri, index_catalog):
    """The manifest's recall@10 leaves each query's own id out (it is always found): it agrees with an exact
    search computed here over every item, and the index reaches the gate on it."""
    m = storage.read_manifest(ivf_index_uri)
    ours = _real_neighbour_recall(ShardedIndex.load(ivf_index_uri), index_catalog.vectors, index_catalog.item_ids)
    assert ours >= 0.95 - 0.02  # 300 sampled queries vs all 3,000: sampling noise
    assert abs(m["recall_at_10"] - ours) < 0.03


def test_measure_recall_leaves_the_query_out():
    truth = np.array([["q", "a", "b"]])
    found = np.array([["q", "a", "x"]])
    assert measure_recall(found[:, :2], truth[:, :2], k=2) == 1.0  # self counted: looks perfect
    assert measure_recall(found, truth, k=2, exclude=np.array(["q"])) == 0.5  # a found, b missed


def test_sharded_index_returns_the_exact_top_k(tmp_path, embeddings_uri, index_catalog, ray_local):
    uri = str(tmp_path / "flat")
    build_index(embeddings_uri, uri, IndexBuildConfig(n_shards=4, spec="Flat", n_eval_queries=100, n_tune_queries=50))
    queries = index_catalog.vectors[::37]
    scores, found = ShardedIndex.load(uri).search(queries, 10)
    exact = faiss.IndexFlatIP(32)
    exact.add(index_catalog.vectors)
    true_scores, rows = exact.search(queries, 10)
    np.testing.assert_allclose(scores, true_scores, atol=1e-5)
    assert (found == index_catalog.item_ids[rows]).mean() > 0.99  # equal scores may swap places
    assert measure_recall(found, index_catalog.item_ids[rows]) > 0.99


def test_exact_top_k_split_over_tasks_equals_one_scan(tmp_path, index_catalog, ray_local, monkeypatch):
    """The recall's ground truth, split over Ray tasks by runs of whole files (here 7 files of ~430 rows,
    two files a task, the last one alone), is the exact top-k of the whole table: the same ids as one scan in this
    process, and as FAISS's exact search."""
    uri = str(tmp_path / "emb")
    write_embedding_table(uri, index_catalog.item_ids, index_catalog.vectors, n_files=7)
    monkeypatch.setattr(index_build, "EXACT_TASK_ROWS", 700)
    queries = index_catalog.vectors[::53]
    found = index_build.exact_neighbours(uri, queries, 11)
    np.testing.assert_array_equal(found, exact_neighbours_streamed(uri, queries, 11))
    exact = faiss.IndexFlatIP(32)
    exact.add(index_catalog.vectors)
    _, rows = exact.search(queries, 11)
    assert (found == index_catalog.item_ids[rows]).mean() > 0.99  # equal scores may swap places


def test_build_is_deterministic_for_a_seed(tmp_path, embeddings_uri, ray_local):
    config = IndexBuildConfig(n_shards=2, spec="IVF32,SQ8", n_eval_queries=100, n_tune_queries=100, seed=7)
    for name in ("a", "b"):
        build_index(embeddings_uri, str(tmp_path / name), config)
    a, b = storage.read_manifest(str(tmp_path / "a")), storage.read_manifest(str(tmp_path / "b"))
    for shard_a, shard_b in zip(a["shards"], b["shards"]):  # file names are unique per publish, bytes equal
        assert (tmp_path / "a" / shard_a["faiss"]).read_bytes() == (tmp_path / "b" / shard_b["faiss"]).read_bytes()
    assert a["search_params"] == b["search_params"] and a["recall_at_10"] == b["recall_at_10"]


def test_build_under_min_recall_fails_and_publishes_nothing(tmp_path, embeddings_uri, ray_local):
    out = str(tmp_path / "weak")
    # plain 2-byte PQ codes cannot rank near neighbours of 32-d vectors well enough for recall 0.99
    config = IndexBuildConfig(n_shards=2, spec="IVF16,PQ4x4", min_recall=0.99, n_eval_queries=100, n_tune_queries=100)
    with pytest.raises(RecallTooLowError, match="recall@10"):
        build_index(embeddings_uri, out, config)
    assert os.listdir(tmp_path) == []  # neither the index nor its staging dir

    result = CliRunner().invoke(
        main, ["build-index", embeddings_uri, out, "--shards", "2", "--index", "IVF16,PQ4x4", "--min-recall", "0.99"]
    )
    assert result.exit_code == 1 and "recall@10" in result.output and "Traceback" not in result.output
    assert os.listdir(tmp_path) == []


def test_a_table_with_a_repeated_id_fails_the_build_naming_it(tmp_path, index_catalog, ray_local):
    """Two shards, the repeat in the other shard from its first occurrence: the ids are compared across shards."""
    ids = np.array(index_catalog.item_ids[:400], dtype=object)
    ids[399] = ids[0]
    uri = str(tmp_path / "emb")
    write_embedding_table(uri, ids, index_catalog.vectors[:400])
    with pytest.raises(ValueError, match="duplicate item_ids"):
        build_index(uri, str(tmp_path / "idx"), IndexBuildConfig(n_shards=2, spec="Flat", n_eval_queries=50, n_tune_queries=50))
    assert not os.path.exists(tmp_path / "idx")


def test_cli_auto_under_a_tight_budget_builds_fast_scan_pq_with_exact_rerank(tmp_path, embeddings_uri, index_catalog, ray_local):
    out = str(tmp_path / "pq")
    args = ["build-index", embeddings_uri, out, "--shards", "2", "--memory-budget", "100KiB", "--eval-queries", "200"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = storage.read_manifest(out)
    assert manifest["spec"].endswith("x4fs,RFlat") and "k_factor" in manifest["search_params"]
    ours = _real_neighbour_recall(ShardedIndex.load(out), index_catalog.vectors, index_catalog.item_ids)
    assert ours >= 0.95 - 0.02 and abs(manifest["recall_at_10"] - ours) < 0.03
    _, found = ShardedIndex.load(out).search(index_catalog.vectors[:200], 10)
    assert (found[:, 0] == index_catalog.item_ids[:200]).all()  # re-ranking separates near-duplicates


def _damaged_copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def test_corrupt_or_missing_shard_files_give_a_clear_error(tmp_path, ivf_index_uri):
    shards = storage.read_manifest(ivf_index_uri)["shards"]
    truncated = _damaged_copy(ivf_index_uri, str(tmp_path / "truncated"))
    path = os.path.join(truncated, shards[1]["faiss"])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(IndexFilesError, match=rf"{re.escape(shards[1]['faiss'])}.*Rebuild"):
        ShardedIndex.load(truncated)

    missing = _damaged_copy(ivf_index_uri, str(tmp_path / "missing"))
    os.remove(os.path.join(missing, shards[2]["ids"]))
    with pytest.raises(IndexFilesError, match=rf"{re.escape(shards[2]['ids'])} is missing"):
        ShardedIndex.load(missing)

    result = CliRunner().invoke(main, ["search", missing, "--item-id", "item-000001"])
    assert result.exit_code == 1 and "is missing" in result.output and "Traceback" not in result.output


def test_search_cli_by_item_id_and_vector_file(tmp_path, ivf_index_uri, index_catalog):
    result = CliRunner().invoke(main, ["search", ivf_index_uri, "--item-id", index_catalog.item_ids[5], "--k", "3"])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0].split("\t")
    assert first[:3] == ["0", "1", index_catalog.item_ids[5]]

    np.save(tmp_path / "q.npy", index_catalog.vectors[7])
    result = CliRunner().invoke(main, ["search", ivf_index_uri, "--vector-file", str(tmp_path / "q.npy"), "--json"])
    assert result.exit_code == 0, result.output
    assert '"item_id": "%s"' % index_catalog.item_ids[7] in result.output.splitlines()[0]


def test_every_command_and_option_has_help():
    for name, command in main.commands.items():
        assert command.help and "Example:" in command.help, name
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"{name} {param.name}"


@pytest.fixture
def s3_bucket(s3_env):
    """A bucket on the module's moto S3 server."""
    fs, _ = storage.get_fs("s3://bucket")
    fs.mkdir("bucket")
    yield "s3://bucket"


def test_index_dir_on_s3_loads_and_searches(s3_bucket, ivf_index_uri, index_catalog):
    local = ShardedIndex.load(ivf_index_uri)
    uri = f"{s3_bucket}/index"
    fs, path = storage.get_fs(uri)
    fs.put(ivf_index_uri, path, recursive=True)  # manifest included: a published copy
    on_s3 = ShardedIndex.load(uri)
    queries = index_catalog.vectors[:50]
    assert (on_s3.search(queries, 10)[1] == local.search(queries, 10)[1]).all()

    write_index(local.shards[0].index, f"{uri}/copy.faiss")
    first = storage.read_manifest(ivf_index_uri)["shards"][0]["faiss"]
    assert fs.size(f"{path}/copy.faiss") == os.path.getsize(os.path.join(ivf_index_uri, first))
