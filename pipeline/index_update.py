"""The nightly index: update the last published index with what changed, or rebuild it, and say which.

An update starts from the previous night's index dir: one Ray task per shard reads its shard, removes the
rows of deleted and edited items it holds, adds the vectors of the new and edited items whose id hashes to
it (the same trained quantizer and codec, so the shards still search together) and writes the shard to the
new index dir. Tonight's vectors come from the table's `fresh_files` (the embed stage writes the rows it
embedded in files of their own). Recall@10 against exact search is then measured on queries drawn from the
new vectors, and the dir is published atomically with it, as a build is. It rebuilds instead (index_build.build_index) when

- there is no previous index, or its shards cannot remove vectors (HNSW, a refined RFlat index);
- the model, the metric, the shard count or the index spec asked for changed;
- the items changed since the last full build (added + edited + deleted, summed over the updates) exceed
  `max_changed_share` of the vectors that build held: the quantizer was trained on a catalog that is no
  longer there;
- the updated index misses the recall gate (`min_recall`) with the search parameters of the build.

The manifest says `mode` (build | update) and `reason`, the last full build (`base_build`) and the
changes since it (`changed_since_build`); the nightly report prints them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline import index as ix
from pipeline import index_tuning as tuning
from pipeline import storage
from pipeline.embedding_scan import gather, merge_top_k, read_vectors
from pipeline.id_shuffle import id_parts, n_parts
from pipeline.index_build import IndexBuildConfig, build_index, exact_top_k_tasks

log = logging.getLogger(__name__)

DEFAULT_MAX_CHANGED_SHARE = 0.10
# queries of the recall gate after an update: each costs a scan of the whole table (the exact top-k), and
# 300 x 10 neighbours measure a recall near 0.95 to +-0.008 (2 standard errors)
UPDATE_QUERIES = 300


class CannotUpdate(Exception):
    """The previous index cannot take the night's changes; the message says why (the rebuild's reason)."""


@dataclass
class Changes:
    """What differs between two embedding tables, by item id."""

    added: np.ndarray  # [A] ids in the new table only
    edited: np.ndarray  # [E] ids in both whose content hash or model version differs
    deleted: np.ndarray  # [R] ids in the old table only
    n_current: int  # rows of the new table

    @property
    def n_changed(self) -> int:
        return len(self.added) + len(self.edited) + len(self.deleted)


KEYS = pa.schema([("item_id", pa.string()), ("content_hash", pa.string()), ("model_version", pa.string())])


def table_changes(old: pa.Table, new: pa.Table) -> Changes:
    """Added, edited and deleted item ids between the keys (KEYS) of two embedding tables, a join on item_id
    (`n_current`: the rows of `new`)."""
    old = old.append_column("in_old", pa.array(np.ones(len(old), dtype=bool)))
    new = new.append_column("in_new", pa.array(np.ones(len(new), dtype=bool)))
    both = new.join(old, "item_id", join_type="full outer", right_suffix="_old")
    in_new, in_old = (pc.fill_null(both.column(c), False) for c in ("in_new", "in_old"))
    same = pc.and_(pc.equal(both.column("content_hash"), both.column("content_hash_old")),
                   pc.equal(both.column("model_version"), both.column("model_version_old")))
    edited = pc.and_(pc.and_(in_new, in_old), pc.invert(pc.fill_null(same, False)))

    def ids(mask: pa.ChunkedArray) -> np.ndarray:
        return both.column("item_id").filter(mask).to_numpy(zero_copy_only=False).astype(object)

    return Changes(added=ids(pc.and_(in_new, pc.invert(in_old))), edited=ids(edited),
                   deleted=ids(pc.and_(in_old, pc.invert(in_new))), n_current=len(new))


def changes_by_task(previous_uri: str, current_uri: str, n_rows: int) -> Changes:
    """`table_changes` of two published tables over Ray tasks: both tables' keys shuffled by a hash of the id
    (pipeline/id_shuffle.py, one part per ID_BUCKET_ROWS of `n_rows`), one task per part joins its ids of
    both; no process holds every id, and the driver gets the changed ids only."""
    parts = n_parts(n_rows)
    old, _ = id_parts(previous_uri, KEYS.names, "item_id", parts)
    new, _ = id_parts(current_uri, KEYS.names, "item_id", parts)
    task = ray.remote(_part_changes).options(num_cpus=1)
    found = ray.get([task.remote(len(o), *o, *n) for o, n in zip(old, new)])
    return Changes(*(np.concatenate([getattr(p, f) for p in found]) for f in ("added", "edited", "deleted")),
                   n_current=sum(p.n_current for p in found))


def _part_changes(n_old: int, *tables: pa.Table) -> Changes:
    """The changes among one part's ids: the first `n_old` tables are the previous table's."""
    def keys(parts: tuple[pa.Table, ...]) -> pa.Table:
        return pa.concat_tables([KEYS.empty_table(), *(t.cast(KEYS) for t in parts)])

    return table_changes(keys(tables[:n_old]), keys(tables[n_old:]))


@ray.remote(num_cpus=1)
def _update_shard_task(previous_uri: str, entry: dict, spec: str, remove: np.ndarray, vectors: np.ndarray,
                       add_ids: np.ndarray, out_uri: str, shard: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as cache_dir:
        loaded = ix.read_shard(previous_uri, entry, spec, cache_dir)
        index, faiss_ids, item_ids = ix.update_shard(loaded.index, loaded.faiss_ids, loaded.item_ids, remove,
                                                     vectors, add_ids, threads)
        return ix.write_shard(index, faiss_ids, item_ids, out_uri, shard)


def _check_updatable(previous: dict, emb_manifest: dict, config: IndexBuildConfig, n_current: int) -> None:
    spec = previous["spec"]
    if not ix.updatable(spec):
        raise CannotUpdate(f"the previous index is {spec}, whose shards cannot remove vectors")
    if previous.get("model_version") != emb_manifest.get("model_version"):
        raise CannotUpdate(f"the model changed ({previous.get('model_version')} -> {emb_manifest.get('model_version')}): "
                           "every vector is new")
    if previous.get("metric") != ix.METRIC or previous.get("dim") != emb_manifest.get("dim"):
        raise CannotUpdate("the metric or the dimension changed")
    if len(previous["shards"]) != config.n_shards:
        raise CannotUpdate(f"the shard count changed ({len(previous['shards'])} -> {config.n_shards})")
    wanted = config.spec if config.spec != "auto" else ix.choose_index_spec(n_current, previous["dim"], config.memory_budget_bytes)
    if _kind(wanted) != _kind(spec):
        raise CannotUpdate(f"the index spec for {n_current} vectors is {wanted}, the previous index is {spec}")


def _kind(spec: str) -> str:
    """The spec without its list count (IVF4096,SQ8 -> IVF,SQ8): the list count follows the catalog's size
    slowly, and the changed-share limit is what bounds that drift."""
    return "".join(c for c in spec.split(",")[0] if not c.isdigit()) + "," + ",".join(spec.split(",")[1:])


def update_index(previous_uri: str, embeddings_uri: str, out_uri: str, config: IndexBuildConfig,
                 max_changed_share: float = DEFAULT_MAX_CHANGED_SHARE, overwrite: bool = False) -> dict:
    """Publish at `out_uri` the index at `previous_uri` with the changes of `embeddings_uri` since the table
    it was made from; returns the manifest. Raises CannotUpdate (nothing published) when a rebuild is due.
    Needs Ray initialised by the caller."""
    storage.check_can_publish(out_uri, overwrite)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    previous = storage.read_manifest(previous_uri)
    emb_manifest = storage.read_manifest(embeddings_uri)
    if not storage.is_published(previous["embeddings"]):
        raise CannotUpdate(f"the embedding table the previous index was made from ({previous['embeddings']}) is gone")
    changes = changes_by_task(previous["embeddings"], embeddings_uri, previous["n_vectors"])
    timings["diff_s"] = time.perf_counter() - start
    _check_updatable(previous, emb_manifest, config, changes.n_current)
    base = previous.get("base_build") or {"built_at": previous.get("built_at"), "n_vectors": previous["n_vectors"]}
    since = previous.get("changed_since_build", 0) + changes.n_changed
    share = since / max(base["n_vectors"], 1)
    if share > max_changed_share:
        raise CannotUpdate(f"{since} items changed since the full build of {base['built_at']} "
                           f"({share:.1%} of its {base['n_vectors']}), over the limit of {max_changed_share:.0%}")
    log.info("updating %s: %d added, %d edited, %d deleted", previous_uri, len(changes.added),
             len(changes.edited), len(changes.deleted))

    step = time.perf_counter()
    upserted = np.concatenate([changes.added, changes.edited])
    new_ids, new_vectors = _read_upserted(embeddings_uri, emb_manifest, previous, upserted)
    timings["read_s"] = time.perf_counter() - step
    removed = np.concatenate([changes.deleted, changes.edited])
    with storage.staging(out_uri) as stage:
        step = time.perf_counter()
        shards = _update_shards(previous_uri, previous, removed, new_ids, new_vectors, stage)
        timings["update_s"] = time.perf_counter() - step

        step = time.perf_counter()
        queries, query_ids = _queries(new_ids, new_vectors, embeddings_uri, changes, config)
        k1 = tuning.RECALL_K + 1
        truth = exact_top_k_tasks(embeddings_uri, queries, k1)  # the exact scan runs while the index opens here
        index = ix.ShardedIndex.open(stage, shards, previous["dim"], previous["spec"], previous["search_params"])
        _, found = index.search(queries, k1)
        recall = tuning.measure_recall(found, merge_top_k(ray.get(truth), k1)[1], exclude=query_ids)
        timings["recall_s"] = time.perf_counter() - step
        if recall < config.min_recall:
            raise CannotUpdate(f"the updated index reaches recall@{tuning.RECALL_K} {recall:.4f} on {len(queries)} "
                               f"queries from the new vectors, under the gate {config.min_recall}")
        timings["total_s"] = time.perf_counter() - start
        manifest = {
            **{k: previous[k] for k in ("model_version", "model_dir", "dim", "metric", "spec", "search_params", "config", "seed")
               if k in previous},
            "embeddings": embeddings_uri,
            "n_vectors": index.ntotal,
            "shards": shards,
            f"recall_at_{tuning.RECALL_K}": round(recall, 4),
            "n_queries": int(len(queries)),
            "mode": "update",
            "reason": (f"{len(changes.added)} added, {len(changes.edited)} edited, {len(changes.deleted)} deleted: "
                       f"{share:.1%} changed since the full build, under the limit of {max_changed_share:.0%}"),
            "updated_from": previous_uri,
            "changes": {"added": len(changes.added), "edited": len(changes.edited), "deleted": len(changes.deleted)},
            "base_build": base,
            "changed_since_build": since,
            "build_seconds": round(timings["total_s"], 2),
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if manifest["n_vectors"] != changes.n_current:
            raise ix.IndexFilesError(f"the updated index holds {manifest['n_vectors']} vectors, the table {changes.n_current}")
        return storage.publish(stage, out_uri, manifest, overwrite=overwrite)


def _read_upserted(embeddings_uri: str, emb_manifest: dict, previous: dict, upserted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vectors of the new and edited items: from the table's `fresh_files` alone when the embed stage
    wrote them against the same previous table the index was made from (the nightly case), else a scan."""
    fresh = emb_manifest.get("fresh_files")
    if fresh is not None and emb_manifest.get("previous") == previous["embeddings"]:
        ids, vectors = read_vectors(embeddings_uri, upserted, previous["dim"], fresh)
        if len(ids) == len(upserted):
            return ids, vectors
        log.warning("%d of %d new or edited items are not in the fresh files: reading the whole table",
                    len(upserted) - len(ids), len(upserted))
    return read_vectors(embeddings_uri, upserted, previous["dim"])


def _update_shards(previous_uri: str, previous: dict, removed: np.ndarray, new_ids: np.ndarray,
                   new_vectors: np.ndarray, stage: str) -> list[dict]:
    """One Ray task per shard: every shard looks up the removed ids in its own id map (a full build shards
    by row range, so any shard may hold an id); the new vectors go to the shard their id hashes to."""
    n_shards = len(previous["shards"])
    added_to = ix.shard_of(new_ids, n_shards)
    cpus = int(ray.available_resources().get("CPU", os.cpu_count() or 1))
    threads = max(1, cpus // n_shards)
    removed_ref = ray.put(removed)
    refs = []
    for s, entry in enumerate(previous["shards"]):
        rows = np.flatnonzero(added_to == s)
        refs.append(_update_shard_task.remote(previous_uri, entry, previous["spec"], removed_ref,
                                              new_vectors[rows], new_ids[rows], stage, s, threads))
    return ray.get(refs)


def _queries(new_ids: np.ndarray, new_vectors: np.ndarray, embeddings_uri: str, changes: Changes,
             config: IndexBuildConfig) -> tuple[np.ndarray, np.ndarray]:
    """Up to UPDATE_QUERIES of the new and edited vectors (seeded); a night with only deletions is measured
    on random rows of the table instead."""
    rng = np.random.default_rng(config.seed)
    n = min(config.n_eval_queries, UPDATE_QUERIES)
    if len(new_ids):
        rows = np.sort(rng.choice(len(new_ids), size=min(len(new_ids), n), replace=False))
        return new_vectors[rows], new_ids[rows]
    rows = gather(embeddings_uri, rng.choice(changes.n_current, size=min(changes.n_current, n), replace=False))
    return rows["embedding"], rows["item_id"]


def build_or_update(embeddings_uri: str, out_uri: str, config: IndexBuildConfig, previous_uri: str | None = None,
                    max_changed_share: float = DEFAULT_MAX_CHANGED_SHARE, overwrite: bool = False) -> dict:
    """The nightly index stage: update `previous_uri` when it can take the changes, else build from scratch.
    The manifest's `mode` and `reason` say which and why. `max_changed_share` 0 always rebuilds."""
    if previous_uri is None or not storage.is_published(previous_uri):
        reason = "no previous index"
    elif max_changed_share <= 0:
        reason = "updates are switched off (max_changed_share 0)"
    else:
        try:
            return update_index(previous_uri, embeddings_uri, out_uri, config, max_changed_share, overwrite)
        except CannotUpdate as e:
            reason = str(e)
    log.info("building the index from scratch: %s", reason)
    return build_index(embeddings_uri, out_uri, config, overwrite, reason=reason)
