"""The nightly job: one run date -> embed (incremental) -> build-index -> dedup -> backfill -> report.

    OUTPUT_ROOT/dt=YYYY-MM-DD/embeddings/   published embedding table (+ _rejects/)
    OUTPUT_ROOT/dt=YYYY-MM-DD/index/        sharded FAISS index
    OUTPUT_ROOT/dt=YYYY-MM-DD/dedup/        duplicate_pairs/ + duplicate_clusters/
    OUTPUT_ROOT/dt=YYYY-MM-DD/backfill/     predicted categories
    OUTPUT_ROOT/dt=YYYY-MM-DD/report.json   written last: the run is done
    OUTPUT_ROOT/dt=YYYY-MM-DD/report.md
    OUTPUT_ROOT/latest.json                 the newest finished run date: moved forward only, after a whole
                                            run succeeded (and repaired if a crash kept it from moving)

Every stage publishes atomically with its manifest, so a run is resumable at stage granularity: a
re-run skips the stages already published and starts at the first one that is not (a killed stage
left only a staging directory, which is cleared). A finished date is not run again. The embed stage is
incremental against the embedding table of the run that `latest.json` names. Resources come from the
config; this module is the only place that turns them into Ray settings.

Run: `item-pipeline nightly --config jobs/nightly.yaml [--date 2026-11-21] [--output-root DIR]`
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

from jobs.config import NightlyConfig
from pipeline import storage
from pipeline.review import write_review

log = logging.getLogger(__name__)

STAGES = ("embeddings", "index", "dedup", "backfill")
REPORT = "report.json"
LATEST = "latest.json"


class StageFailed(RuntimeError):
    """A stage raised; the message names the stage. Nothing of that stage was published."""

    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(f"stage {stage!r} failed: {type(error).__name__}: {error}")
        self.stage = stage


def run_dir(config: NightlyConfig, run_date: dt.date) -> str:
    return storage.join(config.output_root, f"dt={run_date.isoformat()}")


def advance_latest(config: NightlyConfig) -> dict[str, str] | None:
    """Point latest.json at the newest run date that finished (its report.json exists), never backwards.

    Called before and after every run: a re-run of an older date leaves the pointer where it is, and a
    pointer that a crash left behind (report written, pointer not yet moved) is repaired before the next
    run reads it as its incremental base. Returns the pointer (None: no run has finished yet).
    """
    fs, root = storage.get_fs(config.output_root)
    latest_uri = storage.join(config.output_root, LATEST)
    current = storage.read_json(latest_uri) if storage.exists(latest_uri) else None
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] if fs.exists(root) else []
    for day in sorted((n[len("dt="):] for n in names if n.startswith("dt=")), reverse=True):
        if current is not None and day <= current["run_date"]:
            break  # nothing newer than the pointer has finished
        run = storage.join(config.output_root, f"dt={day}")
        if storage.exists(storage.join(run, REPORT)):
            if current is not None:
                log.warning("latest.json named %s; run %s finished after it: pointer moved forward", current["run_date"], day)
            current = {"run_date": day, "run_dir": run}
            storage.write_json(latest_uri, current)
            break
    return current


def previous_run(config: NightlyConfig, run_date: dt.date) -> str | None:
    """The run dir of the last successful run before `run_date` (from latest.json), if any: its embedding
    table is the embed stage's incremental base, its index the one the index stage updates."""
    latest = storage.join(config.output_root, LATEST)
    if not storage.exists(latest):
        return None
    pointer = storage.read_json(latest)
    if pointer["run_date"] >= run_date.isoformat():
        return None  # a back-fill of an older date does not read the future
    return pointer["run_dir"]


def _stage_embed(config: NightlyConfig, run_date: dt.date, out: str, previous: str | None) -> dict:
    from pipeline.embed import EmbedOptions, run_embed

    e = config.embed
    options = EmbedOptions(
        batch_size=e.batch_size, concurrency=e.encode_actors, num_gpus=e.gpus_per_actor,
        encode_threads=e.encode_threads or None, precision=e.precision, previous=previous, columns=config.columns,
        run_id=run_date.isoformat(),
    )
    return run_embed(config.catalog, config.model_dir, out, options)


def _stage_index(config: NightlyConfig, embeddings: str, out: str, previous: str | None) -> dict:
    from pipeline.index_build import IndexBuildConfig
    from pipeline.index_update import build_or_update

    i = config.index
    build = IndexBuildConfig(n_shards=i.shards, spec=i.spec, min_recall=i.min_recall,
                             memory_budget_bytes=int(i.memory_budget_gb * 2**30))
    return build_or_update(embeddings, out, build, previous, i.max_changed_share)


def _stage_dedup(config: NightlyConfig, index: str, embeddings: str, out: str) -> dict:
    from pipeline.dedup import read_groups, run_dedup

    d = config.dedup
    groups = read_groups(config.catalog, config.columns) if d.calibrate_precision > 0 else None
    calibrate = (groups, d.calibrate_precision) if groups is not None and groups.notna().any() else None
    return run_dedup(index, embeddings, out, None if calibrate else d.threshold, d.k, calibrate,
                     num_actors=d.actors, max_cluster_share=d.max_cluster_share)


def _stage_backfill(config: NightlyConfig, index: str, embeddings: str, out: str) -> dict:
    from pipeline.backfill import run_backfill

    b = config.backfill
    return run_backfill(index, embeddings, config.catalog, out, config.columns, b.k, b.min_confidence, plot=True)


def run_nightly(config: NightlyConfig, run_date: dt.date) -> dict[str, Any]:
    """Run (or resume) the nightly job for `run_date`; returns the run report.

    Needs Ray initialised by the caller. Raises StageFailed naming the stage on any failure; what was
    published before it stays, and a re-run resumes there.
    """
    root = run_dir(config, run_date)
    if storage.exists(storage.join(root, REPORT)):
        log.info("run %s is already complete (%s): nothing to do", run_date, root)
        return {**storage.read_json(storage.join(root, REPORT)), "already_complete": True}

    out = {stage: storage.join(root, stage) for stage in STAGES}
    advance_latest(config)  # repair a pointer a crash left behind before reading it
    before = previous_run(config, run_date)
    previous = storage.join(before, "embeddings") if before else None
    steps: dict[str, Callable[[], dict]] = {
        "embeddings": lambda: _stage_embed(config, run_date, out["embeddings"], previous),
        "index": lambda: _stage_index(config, out["embeddings"], out["index"], storage.join(before, "index") if before else None),
        "dedup": lambda: _stage_dedup(config, out["index"], out["embeddings"], out["dedup"]),
        "backfill": lambda: _stage_backfill(config, out["index"], out["embeddings"], out["backfill"]),
    }
    manifests, timings, resumed = {}, {}, []
    for stage in STAGES:
        if storage.is_published(out[stage]):
            log.info("stage %s already published at %s: skipped", stage, out[stage])
            manifests[stage] = storage.read_manifest(out[stage])
            resumed.append(stage)
            continue
        storage.remove_stale_staging(out[stage])  # what a killed attempt left behind
        log.info("stage %s -> %s", stage, out[stage])
        start = time.perf_counter()
        try:
            manifests[stage] = steps[stage]()
        except Exception as e:
            raise StageFailed(stage, e) from e
        timings[stage] = round(time.perf_counter() - start, 2)
        if stage != "embeddings":  # the embed job logs its own summary line
            log.info("%s: %s (%.1f s)", stage, stage_summary(stage, manifests[stage]), timings[stage])

    report = build_report(run_date, root, previous, manifests, timings, resumed)
    report["modality_balance"] = _balance(config, out["embeddings"], previous)
    if report["modality_balance"].get("flag"):
        log.warning("modality balance: %s", report["modality_balance"]["flag"])
    report["review"] = write_review(root, report)  # before the commit point: a failed page re-runs
    log.info("review page: %s", report["review"])
    _write_text(storage.join(root, "report.md"), report_markdown(report))
    storage.write_json(storage.join(root, REPORT), report)  # the run's commit point
    advance_latest(config)  # forward only: a re-run of an older date leaves it where it is
    return report


def _balance(config: NightlyConfig, embeddings: str, previous: str | None) -> dict[str, Any]:
    """Today's modality balance beside the previous run's (from its report), flagged on a large change."""
    from pipeline.balance import compare_nights, modality_balance

    yesterday = None
    if previous is not None:
        report_uri = storage.join(previous.rstrip("/").rsplit("/", 1)[0], REPORT)
        if storage.exists(report_uri):
            yesterday = storage.read_json(report_uri).get("modality_balance")
    return compare_nights(modality_balance(config.catalog, config.columns, config.model_dir, embeddings), yesterday)


def stage_summary(stage: str, m: dict[str, Any]) -> str:
    """One line of what a published stage holds, from its manifest."""
    if stage == "index":
        return (f"{m.get('mode', 'build')} of {m.get('spec')} in {len(m.get('shards', []))} shards, {m.get('n_vectors')} "
                f"vectors, recall@10 {m.get('recall_at_10')} ({m.get('reason', 'full build')})")
    if stage == "dedup":
        if m["threshold"] is None:  # a calibration no cut reached (pipeline/dedup.py): nothing published
            cal = m["calibration"]
            return (f"no pairs published: no threshold reaches precision {cal['target_precision']} "
                    f"(best {cal['best_precision']:.3f})")
        return f"{m['n_pairs']} pairs in {m['n_clusters']} clusters at cosine >= {m['threshold']:.4f}"
    if stage == "backfill":
        return f"{m.get('n_filled')} of {m.get('n_unlabelled')} uncategorised rows filled"
    return f"{m.get('embedded')} embedded, {m.get('unchanged_skipped')} unchanged, {m.get('rejected')} rejected"


def build_report(run_date: dt.date, root: str, previous: str | None, manifests: dict[str, dict],
                 timings: dict[str, float], resumed: list[str]) -> dict[str, Any]:
    """The run's numbers in one place: counts, rejects, timings, recall, clusters, backfill coverage."""
    emb, idx, dup, bf = (manifests[s] for s in STAGES)
    return {
        "run_date": run_date.isoformat(),
        "run_dir": root,
        "previous_embeddings": previous,
        "model_version": emb["model_version"],
        "counts": {k: emb[k] for k in ("rows_in", "embedded", "unchanged_skipped", "rejected")},
        "reconciles": emb["rows_in"] == emb["embedded"] + emb["unchanged_skipped"] + emb["rejected"],
        "rejects_by_reason": emb["rejects_by_reason"],
        "image_errors": emb["image_errors"],
        "modalities": emb.get("modalities", {}),
        "index": {"recall_at_10": idx.get("recall_at_10"), "shards": len(idx.get("shards", [])),
                  "spec": idx.get("spec"), "vectors": idx.get("n_vectors"), "mode": idx.get("mode", "build"),
                  "reason": idx.get("reason"), "changes": idx.get("changes"),
                  "changed_since_build": idx.get("changed_since_build")},
        "dedup": {"threshold": dup["threshold"], "calibration": dup.get("calibration"), "pairs": dup["n_pairs"], "clusters": dup["n_clusters"],
                  "cluster_size_histogram": dup["cluster_size_histogram"], "cluster_quality": dup.get("cluster_quality")},
        "backfill": {**{k: bf.get(k) for k in ("n_unlabelled", "n_filled", "n_unfilled", "n_no_embedding", "fill_accuracy")},
                     "leave_one_out_accuracy": bf.get("leave_one_out", {}).get("accuracy")},
        "stage_seconds": timings,
        "stages_resumed": resumed,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _dedup_line(d: dict[str, Any], sizes: str) -> str:
    cal = d.get("calibration")
    if cal and not cal["reached"]:
        return (f"- duplicates: NONE PUBLISHED: no threshold reaches precision {cal['target_precision']} on the labelled "
                f"groups (best {cal['best_precision']:.3f}, at cosine >= {cal['best_threshold']:.4f}); the model does "
                "not tell these duplicates apart (docs/evaluation.md)")
    return (f"- duplicates at cosine >= {d['threshold']:.4f}"
            + (f" (calibrated to precision {cal['precision']:.3f} on labelled groups)" if cal else "")
            + f": {d['pairs']} pairs in {d['clusters']} clusters (sizes {sizes})")


def report_markdown(report: dict[str, Any]) -> str:
    """A short human summary of the run report."""
    c, d, b, i = report["counts"], report["dedup"], report["backfill"], report["index"]
    rejects = ", ".join(f"{k} {v}" for k, v in report["rejects_by_reason"].items()) or "none"
    image_errors = ", ".join(f"{k} {v}" for k, v in report["image_errors"].items()) or "none"
    sizes = ", ".join(f"{k}: {v}" for k, v in d["cluster_size_histogram"].items()) or "none"
    times = ", ".join(f"{k} {v} s" for k, v in report["stage_seconds"].items()) or "all resumed"
    return "\n".join([
        f"# Nightly run {report['run_date']}",
        "",
        f"- model: `{report['model_version']}`; incremental against: {report['previous_embeddings'] or 'nothing (full run)'}",
        f"- rows in {c['rows_in']} = embedded {c['embedded']} + unchanged {c['unchanged_skipped']} + "
        f"rejected {c['rejected']} ({'reconciles' if report['reconciles'] else 'DOES NOT RECONCILE'})",
        f"- rejects by reason: {rejects}; image errors (embedded from title): {image_errors}",
        *_balance_lines(report.get("modality_balance")),
        f"- index: {i['spec']} in {i['shards']} shards, recall@10 vs exact {i['recall_at_10']}; "
        f"{'updated' if i.get('mode') == 'update' else 'built from scratch'}: {i.get('reason') or 'full build'}",
        _dedup_line(d, sizes),
        *([f"- clusters vs labelled groups: pairwise precision {_ratio(q['pair_precision'])}, recall "
           f"{_ratio(q['pair_recall'])} ({q['predicted_pairs']} pairs in clusters, {q['true_pairs']} same-group pairs)"]
          if (q := d.get("cluster_quality")) else []),
        f"- backfill: {b['n_filled']} filled, {b['n_unfilled']} left unfilled of {b['n_unlabelled']} uncategorised rows"
        + (f"; accuracy of the fills vs held-back labels {b['fill_accuracy']:.3f}" if b.get("fill_accuracy") is not None else "")
        + (f"; leave-one-out accuracy on labelled rows {b['leave_one_out_accuracy']:.3f}"
           if b.get("leave_one_out_accuracy") is not None else ""),
        f"- stage times: {times}; resumed (already published): {', '.join(report['stages_resumed']) or 'none'}",
        *([f"- review page (clusters, threshold, backfill, with photos): {report['review']}"] if report.get("review") else []),
        "",
    ])


def _balance_lines(b: dict[str, Any] | None) -> list[str]:
    if not b:
        return []
    counts = b.get("counts", {})
    lines = [f"- embedded from: both {counts.get('image+title', 0)}, title only {counts.get('title', 0)}, "
             f"image only {counts.get('image', 0)} (whole table)"]
    if b.get("sample"):
        prev = b.get("previous") or {}

        def was(key: str) -> str:
            return f" (previous run {prev[key]:.3f})" if prev.get(key) is not None else ""

        lines.append(f"- modality balance on {b['sample']} fixed listings: blanking the title moves the vector "
                     f"{b['title_movement']:.3f}{was('title_movement')}, blanking the photo "
                     f"{b['image_movement']:.3f}{was('image_movement')}; image share {b['image_share']:.3f}"
                     f"{was('image_share')}")
    if b.get("flag"):
        lines.append(f"- **FLAG: {b['flag']}**")
    return lines


def _write_text(uri: str, text: str) -> None:
    fs, path = storage.get_fs(uri)
    with fs.open(path, "w") as f:
        f.write(text)
