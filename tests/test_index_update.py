"""The nightly index is updated in place of a rebuild while it can be, and rebuilt (saying why) when not."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import id_shuffle, storage
from pipeline.embedding_scan import exact_neighbours_streamed
from pipeline.index import ShardedIndex
from pipeline.index_build import IndexBuildConfig
from pipeline.index_tuning import measure_recall
from pipeline.index_update import build_or_update, changes_by_task
from tests.index_data import make_catalog, write_embedding_table


class Week:
    """A catalog that changes every night: new listings, edited ones (new vector, new hash), deleted ones."""

    def __init__(self, n: int = 3000, d: int = 32, seed: int = 0, drift: bool = False):
        both = make_catalog(n=2 * n, d=d, n_groups=n // 20, seed=seed)
        self.rng = np.random.default_rng(seed + 1)
        # adds and edits draw from the other half: the same clusters, or with `drift` from other ones
        self.fresh = make_catalog(n=n, d=d, n_groups=n // 20, seed=seed + 7).vectors if drift else both.vectors[n:]
        self.used = 0
        self.ids, self.vectors = both.item_ids[:n].copy(), both.vectors[:n].copy()
        self.hashes = np.array([f"h-{i}-0" for i in self.ids], dtype=object)
        self.deleted: set[str] = set()

    def _take(self, k: int) -> np.ndarray:
        out = self.fresh[self.used:self.used + k]
        self.used += k
        return out

    def night(self, day: int, adds: int, edits: int, deletes: int) -> dict[str, np.ndarray]:
        order = self.rng.permutation(len(self.ids))
        edited, gone = order[:edits], order[edits:edits + deletes]
        self.vectors[edited] = self._take(edits)
        self.hashes[edited] = [f"h-{i}-{day}" for i in self.ids[edited]]
        old = {"edited": self.ids[edited].copy(), "deleted": self.ids[gone].copy(), "deleted_vectors": self.vectors[gone]}
        self.deleted |= set(self.ids[gone].tolist())
        keep = np.setdiff1d(np.arange(len(self.ids)), gone)
        new_ids = np.array([f"new-{day}-{j:04d}" for j in range(adds)], dtype=object)
        self.ids = np.concatenate([self.ids[keep], new_ids])
        self.vectors = np.concatenate([self.vectors[keep], self._take(adds)])
        self.hashes = np.concatenate([self.hashes[keep], np.array([f"h-{i}-{day}" for i in new_ids], dtype=object)])
        return {**old, "added": new_ids}

    def write(self, uri: str) -> str:
        write_embedding_table(uri, self.ids, self.vectors, hashes=self.hashes)
        return uri


CONFIG = IndexBuildConfig(n_shards=3, spec="IVF32,Flat", min_recall=0.9, n_eval_queries=300, n_tune_queries=200)


def test_table_changes_finds_adds_edits_and_deletes(tmp_path, ray_local, monkeypatch):
    week = Week(n=200)
    before = week.write(str(tmp_path / "d0"))
    truth = week.night(1, adds=5, edits=4, deletes=3)
    after = week.write(str(tmp_path / "d1"))
    # one part (the whole tables' ids in one task), then shuffled over 3 parts from 2 map tasks per table
    # (one file each): the same changes
    for rows_per_part in (id_shuffle.ID_BUCKET_ROWS, 70):
        monkeypatch.setattr(id_shuffle, "ID_BUCKET_ROWS", rows_per_part)
        changes = changes_by_task(before, after, 200)
        assert sorted(changes.added) == sorted(truth["added"])
        assert sorted(changes.edited) == sorted(truth["edited"])
        assert sorted(changes.deleted) == sorted(truth["deleted"])
        assert changes.n_current == 200 + 5 - 3


def test_a_week_of_nightly_changes_is_updated_in_place_and_stays_exact(tmp_path, ray_local):
    """Seven nights of adds, edits and deletes (~2.3% of the catalog each): the index is updated while the
    changes since the full build stay under 10%, then rebuilt, saying so; every night its search finds
    what an exact search over that night's table finds (within the recall gate), never a deleted item,
    and an edited item by its new vector."""
    week = Week()
    previous = None
    modes, reasons = [], []
    for day in range(8):
        night = week.night(day, adds=30, edits=20, deletes=20) if day else None
        emb = week.write(str(tmp_path / f"dt={day}" / "embeddings"))
        out = str(tmp_path / f"dt={day}" / "index")
        manifest = build_or_update(emb, out, CONFIG, previous_uri=previous, max_changed_share=0.10)
        modes.append(manifest["mode"])
        reasons.append(manifest["reason"])
        assert manifest["n_vectors"] == len(week.ids)
        assert manifest["recall_at_10"] >= CONFIG.min_recall

        index = ShardedIndex.load(out)
        _, found = index.search(week.vectors, 11)
        truth = exact_neighbours_streamed(emb, week.vectors, 11)
        assert measure_recall(found, truth, exclude=week.ids) >= CONFIG.min_recall
        returned = set(found[found != None].tolist())  # noqa: E711 (element-wise)
        assert returned <= set(week.ids.tolist()), "an item that is not in tonight's table was returned"
        assert not returned & week.deleted
        if night is not None:
            _, near_deleted = index.search(night["deleted_vectors"], 10)
            assert not set(near_deleted[near_deleted != None].tolist()) & week.deleted  # noqa: E711
            edited_rows = np.flatnonzero(np.isin(week.ids, night["edited"]))
            scores, top = index.search(week.vectors[edited_rows], 1)
            assert (top[:, 0] == week.ids[edited_rows]).mean() >= 0.95  # found by its new vector
        previous = out

    # 70 changes a night on 3,000: updates until the changes since the build pass 300, then a rebuild
    assert modes == ["build", "update", "update", "update", "update", "build", "update", "update"], reasons
    day5 = storage.read_manifest(str(tmp_path / "dt=5" / "index"))
    assert "over the limit of 10%" in day5["reason"] and day5["changed_since_build"] == 0
    day7 = storage.read_manifest(str(tmp_path / "dt=7" / "index"))
    assert day7["changes"] == {"added": 30, "edited": 20, "deleted": 20} and day7["changed_since_build"] == 140


def test_flat_shards_are_updated_too(tmp_path, ray_local):
    week = Week(n=500)
    cfg = IndexBuildConfig(n_shards=2, spec="Flat", n_eval_queries=100, n_tune_queries=50)
    first = build_or_update(week.write(str(tmp_path / "e0")), str(tmp_path / "i0"), cfg)
    assert first["mode"] == "build" and first["reason"] == "no previous index"
    week.night(1, adds=10, edits=5, deletes=5)
    emb = week.write(str(tmp_path / "e1"))
    second = build_or_update(emb, str(tmp_path / "i1"), cfg, previous_uri=str(tmp_path / "i0"))
    assert second["mode"] == "update" and second["recall_at_10"] == 1.0
    _, found = ShardedIndex.load(str(tmp_path / "i1")).search(week.vectors, 1)
    assert (found[:, 0] == week.ids).all()  # exact: every item is its own nearest neighbour


def test_changes_the_quantizer_was_not_trained_for_are_caught_by_the_recall_gate(tmp_path, ray_local):
    """New listings from clusters the build never saw (a new category, a new model of phone photos) fall in
    IVF lists probed for other queries: the update misses the gate and the stage rebuilds, saying so."""
    week = Week(n=3000, drift=True)
    build_or_update(week.write(str(tmp_path / "e0")), str(tmp_path / "i0"), CONFIG)
    week.night(1, adds=60, edits=0, deletes=0)
    manifest = build_or_update(week.write(str(tmp_path / "e1")), str(tmp_path / "i1"), CONFIG,
                               previous_uri=str(tmp_path / "i0"))
    assert manifest["mode"] == "build" and "under the gate 0.9" in manifest["reason"], manifest["reason"]
    assert manifest["recall_at_10"] >= CONFIG.min_recall


@pytest.mark.parametrize("change, reason", [
    ("model", "the model changed"),
    ("spec", "cannot remove vectors"),
    ("shards", "the shard count changed"),
])
def test_what_cannot_be_updated_is_rebuilt_and_the_manifest_says_why(tmp_path, ray_local, change, reason):
    week = Week(n=600)
    spec = "HNSW32" if change == "spec" else "IVF8,Flat"
    cfg = IndexBuildConfig(n_shards=2, spec=spec, n_eval_queries=100, n_tune_queries=50)
    build_or_update(week.write(str(tmp_path / "e0")), str(tmp_path / "i0"), cfg)
    week.night(1, adds=5, edits=5, deletes=5)
    emb = week.write(str(tmp_path / "e1"))
    if change == "model":
        manifest = storage.read_manifest(emb)
        storage.write_json(storage.join(emb, "_manifest.json"), {**manifest, "model_version": "test-model-v2"})
    if change == "shards":
        cfg = IndexBuildConfig(n_shards=3, spec=spec, n_eval_queries=100, n_tune_queries=50)
    manifest = build_or_update(emb, str(tmp_path / "i1"), cfg, previous_uri=str(tmp_path / "i0"))
    assert manifest["mode"] == "build" and reason in manifest["reason"]
    assert manifest["n_vectors"] == len(week.ids)


def test_a_night_of_deletions_only_is_measured_on_random_rows(tmp_path, ray_local):
    week = Week(n=2000)
    build_or_update(week.write(str(tmp_path / "e0")), str(tmp_path / "i0"), CONFIG)
    truth = week.night(1, adds=0, edits=0, deletes=30)
    manifest = build_or_update(week.write(str(tmp_path / "e1")), str(tmp_path / "i1"), CONFIG,
                               previous_uri=str(tmp_path / "i0"))
    assert manifest["mode"] == "update" and manifest["changes"] == {"added": 0, "edited": 0, "deleted": 30}
    assert manifest["n_queries"] == 300 and manifest["recall_at_10"] >= CONFIG.min_recall
    _, found = ShardedIndex.load(str(tmp_path / "i1")).search(truth["deleted_vectors"], 10)
    assert not set(found[found != None].tolist()) & set(truth["deleted"].tolist())  # noqa: E711
