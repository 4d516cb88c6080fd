"""Does the index build's driver stay flat as the catalog grows? Peak RSS of the driver and of the Ray
workers, build and all-pairs dedup time (and with --backfill the category backfill's), at each of several
sizes, in one run.

    PYTHONPATH=. python bench/bench_index_scale.py 256 1000000 4000000 --shards 4 --index IVF4096,SQ8 --work /tmp/bs

With --backfill the write step also writes a catalog of (item_id, category): the category of a vector is
the nearest of 50 random directions, 10% of them null; the backfill step reads its labels and fills the
nulls as the nightly job does (pipeline/backfill.py: `run_backfill`, a Ray Data job with one stage per index shard).

For each size: the generated table (bench_index.generate) is written by one process, then the build and
the all-pairs top-10 dedup each run in a fresh process (`--step`), so that the driver's peak RSS is
theirs alone; a thread in that process samples the resident memory of every Ray worker process every
0.2 s (/proc) and keeps the largest. Prints a Markdown table; the ratios are the last size over the first.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _peak_worker_rss(stop: threading.Event, peak: list[float], by_title: dict[str, float]) -> None:
    """Largest RSS (GiB) of any Ray worker process (ray::..., default_worker.py) seen until `stop` is set,
    read from /proc (Linux); `by_title` keeps the largest private memory (RssAnon: not the object store's
    shared pages a worker maps while it reads or writes blocks) per process title, i.e. what the worker was
    running, e.g. `ray::MapWorker(MapBatches(ShardNeighbours))`."""
    while not stop.wait(0.2):
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                if not (cmd.startswith("ray::") or "default_worker.py" in cmd):
                    continue
                with open(f"/proc/{pid}/status") as f:
                    status = {line.split(":")[0]: line.split()[1] for line in f if line.startswith(("VmRSS:", "RssAnon:"))}
                rss_kib, anon_kib = int(status["VmRSS"]), int(status["RssAnon"])
                peak[0] = max(peak[0], rss_kib / 2**20)
                title = cmd.split(" ")[0] if cmd.startswith("ray::") else "default_worker.py"
                by_title[title] = max(by_title.get(title, 0.0), anon_kib / 2**20)
            except (OSError, KeyError, ValueError):
                continue


def _step(step: str, dim: int, n: int, work: str, shards: int, spec: str, memory_budget: str, seed: int) -> dict:
    """One measured step in this (fresh) process; returns its figures."""
    emb, idx, catalog = os.path.join(work, "embeddings"), os.path.join(work, "index"), os.path.join(work, "catalog.parquet")
    if step == "write":
        from bench.bench_index import generate, write_table

        shutil.rmtree(work, ignore_errors=True)
        ids, vectors = generate(n, dim, seed)
        write_table(emb, ids, vectors)
        rng = np.random.default_rng(seed)
        category = np.argmax(vectors @ rng.standard_normal((dim, 50)).astype(np.float32), axis=1)
        labels = np.where(rng.random(n) < 0.1, None, np.char.add("cat-", category.astype(str)).astype(object))
        pq.write_table(pa.table({"item_id": ids.tolist(), "category": pa.array(labels.tolist(), pa.string())}), catalog)
        return {}
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    stop, peak, by_title = threading.Event(), [0.0], {}
    sampler = threading.Thread(target=_peak_worker_rss, args=(stop, peak, by_title), daemon=True)
    sampler.start()
    start = time.perf_counter()
    if step == "build":
        from jobs.cli import parse_bytes
        from pipeline.index_build import IndexBuildConfig, build_index

        manifest = build_index(emb, idx, IndexBuildConfig(n_shards=shards, spec=spec, memory_budget_bytes=parse_bytes(memory_budget), seed=seed))
        out = {"spec": manifest["spec"], "recall": manifest["recall_at_10"], "timings": manifest["timings"]}
    elif step == "dedup":
        from pipeline.dedup import find_duplicate_pairs

        out = {"pairs": len(find_duplicate_pairs(idx, emb, k=10, threshold=0.95, num_actors=1, threads_per_actor=2))}
    else:  # backfill, as jobs/nightly.py runs it
        from pipeline.backfill import run_backfill

        report = run_backfill(idx, emb, catalog, os.path.join(work, "backfill"), k=10, min_confidence=0.5, overwrite=True)
        out = {"unlabelled": report["n_unlabelled"], "filled": report["n_filled"], "loo_accuracy": report["leave_one_out"]["accuracy"]}
    out["seconds"] = time.perf_counter() - start
    stop.set()
    sampler.join()
    out["driver_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["worker_gib"] = peak[0]
    out["worker_private_gib_by_title"] = {t: round(g, 2) for t, g in sorted(by_title.items(), key=lambda kv: -kv[1])[:4]}
    return out


@click.command()
@click.argument("dim", type=int)
@click.argument("sizes", type=int, nargs=-1, required=True)
@click.option("--shards", default=4, show_default=True)
@click.option("--index", "spec", default="auto", show_default=True, help="FAISS spec; a fixed one compares like with like across sizes.")
@click.option("--memory-budget", default="2GiB", show_default=True, help="Budget for --index auto.")
@click.option("--work", default="bench-output/index-scale", show_default=True, help="Scratch directory (deleted first).")
@click.option("--seed", default=0, show_default=True)
@click.option("--dedup/--no-dedup", default=True, show_default=True, help="Also time the all-pairs dedup.")
@click.option("--backfill/--no-backfill", default=False, show_default=True, help="Also time the category backfill.")
@click.option("--step", type=click.Choice(["write", "build", "dedup", "backfill"]), hidden=True, help="Run one step here (internal).")
def main(dim, sizes, shards, spec, memory_budget, work, seed, dedup, backfill, step):
    """Run the benchmark and print a Markdown table."""
    if step:
        print(json.dumps(_step(step, dim, sizes[0], work, shards, spec, memory_budget, seed)))
        return
    rows = []
    for n in sizes:
        figures = {}
        for s in ["write", "build"] + ["dedup"] * dedup + ["backfill"] * backfill:
            cmd = [sys.executable, __file__, str(dim), str(n), "--shards", str(shards), "--index", spec, "--memory-budget", memory_budget,
                   "--work", os.path.join(work, str(n)), "--seed", str(seed), "--step", s]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
            figures[s] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{n:,} {s}: {figures[s]}", file=sys.stderr, flush=True)
        shutil.rmtree(os.path.join(work, str(n)), ignore_errors=True)
        rows.append((n, figures))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at the end")
    print("\n| vectors | index | build s | build driver peak RSS GiB | build worker peak RSS GiB | recall@10 | all-pairs s | all-pairs driver peak RSS GiB | all-pairs worker peak RSS GiB | pairs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, f in rows:
        b, d = f["build"], f.get("dedup")
        dd = f"{d['seconds']:.1f} | {d['driver_gib']:.2f} | {d['worker_gib']:.2f} | {d['pairs']:,}" if d else "- | - | - | -"
        print(f"| {n:,} | `{b['spec']}` | {b['seconds']:.1f} | {b['driver_gib']:.2f} | {b['worker_gib']:.2f} | {b['recall']:.4f} | {dd} |")
    if backfill:
        print("\n| vectors | unlabelled | filled | leave-one-out accuracy | backfill s | backfill driver peak RSS GiB | backfill worker peak RSS GiB |")
        print("|---|---|---|---|---|---|---|")
        for n, f in rows:
            b = f["backfill"]
            print(f"| {n:,} | {b['unlabelled']:,} | {b['filled']:,} | {b['loo_accuracy']:.3f} | {b['seconds']:.1f} | "
                  f"{b['driver_gib']:.2f} | {b['worker_gib']:.2f} |")
    (n0, f0), (n1, f1) = rows[0], rows[-1]
    print(f"\n{n1 / n0:.0f}x the vectors: build driver RSS x{f1['build']['driver_gib'] / f0['build']['driver_gib']:.2f}, "
          f"build time x{f1['build']['seconds'] / f0['build']['seconds']:.2f}"
          + (f", all-pairs time x{f1['dedup']['seconds'] / f0['dedup']['seconds']:.2f}, all-pairs driver RSS "
             f"x{f1['dedup']['driver_gib'] / f0['dedup']['driver_gib']:.2f}" if dedup else "")
          + (f", backfill time x{f1['backfill']['seconds'] / f0['backfill']['seconds']:.2f}, backfill driver RSS "
             f"x{f1['backfill']['driver_gib'] / f0['backfill']['driver_gib']:.2f}" if backfill else ""))


if __name__ == "__main__":
    main()
