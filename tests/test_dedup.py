"""Duplicate search: the actor's batch function, pairs, clusters, calibration and the CLI job."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline import storage
from jobs.cli import main
from pipeline.dedup import (SMALL_INDEX_BYTES, ShardNeighbours, calibrate_threshold, cluster_pairs, cluster_quality,
                            find_duplicate_pairs, neighbour_pairs, stage_shards)
from pipeline.index import ShardedIndex


def _groups(index_catalog) -> dict[str, set[str]]:
    frame = pd.DataFrame({"item_id": index_catalog.item_ids, "group": index_catalog.group_id}).dropna()
    return {g: set(rows) for g, rows in frame.groupby("group")["item_id"]}


def test_a_small_index_is_searched_by_one_stage_and_a_large_one_by_one_stage_per_shard(ivf_index_uri):
    manifest = storage.read_manifest(ivf_index_uri)
    assert stage_shards(manifest) == [[0, 1, 2]]  # 3,000 vectors of 32-d: one actor, not three
    large = {**manifest, "n_vectors": SMALL_INDEX_BYTES // (4 * manifest["dim"])}
    assert stage_shards(large) == [[0], [1], [2]]


def test_shard_stages_on_a_plain_batch_find_the_whole_index_top_k_and_its_pairs(ivf_index_uri, index_catalog):
    stages = [ShardNeighbours(ivf_index_uri, [shard], k=6) for shard in range(3)]  # as a large index is searched
    assert [len(stage.index.shards) for stage in stages] == [1, 1, 1]  # no stage holds the whole index
    n = len(index_catalog.item_ids)
    batch = pa.table({"item_id": index_catalog.item_ids, "embedding": storage.embedding_array(index_catalog.vectors)})
    for stage in stages:
        batch = stage(batch)
    scores, ids = ShardedIndex.load(ivf_index_uri).search(index_catalog.vectors, 6)
    got_ids = batch["_top_ids"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, 6)
    got_scores = batch["_top_scores"].combine_chunks().flatten().to_numpy().reshape(n, 6)
    assert (got_ids == ids).all()
    np.testing.assert_allclose(got_scores, scores, rtol=1e-6)

    member = next(iter(_groups(index_catalog).values()))
    rows = [i for i, item in enumerate(index_catalog.item_ids) if item in member]
    out = neighbour_pairs(batch.take(rows), 0.99).to_pandas()
    pairs = set(zip(out["item_id"], out["dup_item_id"]))
    a, b, c = sorted(member)
    assert {(a, b), (a, c), (b, c)} <= pairs  # each found from both sides, always as (smaller, larger)
    assert (out["item_id"] < out["dup_item_id"]).all() and (out["score"] >= 0.99).all()


def test_cluster_quality_counts_pairs_inside_clusters_and_groups():
    clusters = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "cluster_id": ["a", "a", "a", "d"]})
    groups = pd.Series({"a": "g1", "b": "g1", "c": "g2", "d": None, "e": "g2", "f": None})
    q = cluster_quality(clusters, groups, list("abcdef"))
    # clustered pairs ab, ac, bc (one right); true pairs ab, ce (one found)
    assert q == {"pair_precision": 1 / 3, "pair_recall": 0.5, "predicted_pairs": 3, "true_pairs": 2}


def test_cluster_pairs_is_connected_components():
    pairs = pd.DataFrame({"item_id": ["b", "c", "x"], "dup_item_id": ["c", "d", "y"], "score": [1.0, 1.0, 1.0]})
    clusters = cluster_pairs(pairs)
    assert dict(zip(clusters["item_id"], clusters["cluster_id"])) == {"b": "b", "c": "b", "d": "b", "x": "x", "y": "x"}


@pytest.fixture(scope="module")
def candidates(ivf_index_uri, embeddings_uri):
    """Every k-NN pair of the catalog (one Ray Data job, shared: each job costs seconds of Ray start-up)."""
    return find_duplicate_pairs(ivf_index_uri, embeddings_uri, k=5, threshold=-1.0, batch_size=700)


def test_duplicate_groups_come_back_as_clusters(candidates, index_catalog):
    assert not candidates.duplicated(["item_id", "dup_item_id"]).any()
    assert (candidates["item_id"] < candidates["dup_item_id"]).all()
    pairs = candidates[candidates["score"] >= 0.99]
    clusters = cluster_pairs(pairs)
    found = [set(m) for _, m in clusters.groupby("cluster_id")["item_id"]]
    truth = list(_groups(index_catalog).values())
    exact = sum(1 for c in found if c in truth)
    assert exact / len(found) >= 0.95  # precision: clusters that are exactly a generated group
    assert exact / len(truth) >= 0.95  # and most groups are found whole


def test_calibrated_threshold_reaches_the_precision(candidates, index_catalog):
    group_of = pd.Series(index_catalog.group_id, index=index_catalog.item_ids)
    cal = calibrate_threshold(candidates, group_of, 0.9)
    above = candidates[candidates["score"] >= cal["threshold"]]
    same = above["item_id"].map(group_of) == above["dup_item_id"].map(group_of)
    assert cal["reached"] and len(above) == cal["pairs"] and same.mean() == cal["precision"] >= 0.9
    assert same.sum() >= 0.95 * 3 * 150  # and it keeps nearly all 450 true pairs
    assert cal["best_precision"] >= cal["precision"] and cal["best_threshold"] >= cal["threshold"]


def test_a_precision_no_threshold_reaches_publishes_no_pairs_and_says_why(tmp_path, ivf_index_uri, embeddings_uri,
                                                                        index_catalog):
    """Labels the vectors cannot match (the groups shuffled): the job publishes no pairs instead of failing,
    and the manifest and the output say what the best cut reached."""
    shuffled = np.random.default_rng(0).permutation(np.asarray(index_catalog.group_id, dtype=object))
    catalog_path = tmp_path / "catalog.parquet"
    pd.DataFrame({"item_id": index_catalog.item_ids, "group_id": shuffled, "category": None}).to_parquet(catalog_path)
    out = str(tmp_path / "dups")
    args = ["dedup", ivf_index_uri, embeddings_uri, out, "--k", "5", "--catalog", str(catalog_path), "--calibrate-precision", "0.9"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "no threshold reaches precision 0.9" in result.output and "no pairs published" in result.output
    manifest = storage.read_manifest(out)
    cal = manifest["calibration"]
    assert manifest["threshold"] is None and not cal["reached"] and cal["best_precision"] < 0.9
    assert manifest["n_pairs"] == 0 and len(pq.read_table(f"{out}/duplicate_pairs")) == 0
    assert manifest["cluster_quality"]["pair_recall"] == 0.0 and manifest["cluster_quality"]["pair_precision"] is None


def test_dedup_cli_calibrates_and_publishes_pairs_and_clusters(tmp_path, ivf_index_uri, embeddings_uri, index_catalog):
    catalog_path = tmp_path / "index_catalog.parquet"
    pd.DataFrame({"item_id": index_catalog.item_ids, "group_id": index_catalog.group_id, "category": None}).to_parquet(catalog_path)
    out = str(tmp_path / "dups")
    args = ["dedup", ivf_index_uri, embeddings_uri, out, "--k", "5", "--catalog", str(catalog_path), "--calibrate-precision", "0.9"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "calibrated threshold" in result.output
    manifest = storage.read_manifest(out)
    pairs = pq.read_table(f"{out}/duplicate_pairs").to_pandas()
    clusters = pq.read_table(f"{out}/duplicate_clusters").to_pandas()
    assert manifest["calibration"]["precision"] >= 0.9 and (pairs["score"] >= manifest["threshold"]).all()
    assert manifest["n_pairs"] == len(pairs) and manifest["n_items_in_clusters"] == len(clusters)
    assert manifest["cluster_size_histogram"].get("3", 0) >= 140
    quality = manifest["cluster_quality"]  # the clusters against the catalog's groups
    # pairs are calibrated to precision 0.9; clusters join pairs transitively, so theirs is a little lower
    assert quality["pair_precision"] >= 0.8 and quality["pair_recall"] >= 0.9 and quality["true_pairs"] == 3 * 150

    result = CliRunner().invoke(main, ["dedup", ivf_index_uri, embeddings_uri, out, "--threshold", "0.99"])
    assert result.exit_code == 1 and "already published" in result.output
    result = CliRunner().invoke(main, ["dedup", ivf_index_uri, embeddings_uri, str(tmp_path / "x")])
    assert result.exit_code == 2 and "--threshold" in result.output


def test_a_catalog_sized_cluster_fails_the_stage_and_publishes_nothing(tmp_path, ivf_index_uri, embeddings_uri):
    """What a collapsed model looks like: at a threshold every neighbour passes, one cluster takes all."""
    out = str(tmp_path / "dups")
    result = CliRunner().invoke(main, ["dedup", ivf_index_uri, embeddings_uri, out, "--threshold", "-1"])
    assert result.exit_code == 1 and "largest duplicate cluster holds" in result.output, result.output
    assert "Traceback" not in result.output and not storage.exists(out) and not storage.is_published(out)
    # the same listings at a sane threshold pass the gate
    result = CliRunner().invoke(main, ["dedup", ivf_index_uri, embeddings_uri, out, "--threshold", "0.97"])
    assert result.exit_code == 0, result.output


def test_a_killed_dedup_actor_is_restarted_and_the_pairs_are_the_same(candidates, ivf_index_uri, embeddings_uri,
                                                                      tmp_path, monkeypatch):
    from pipeline import dedup
    from tests.faults import killed_once

    marker = str(tmp_path / "killed")
    monkeypatch.setattr(dedup, "ShardNeighbours", killed_once(dedup.ShardNeighbours, marker, at_call=1))
    pairs = find_duplicate_pairs(ivf_index_uri, embeddings_uri, 5, -1.0, batch_size=500)
    assert os.path.exists(marker)
    pd.testing.assert_frame_equal(pairs, candidates)
