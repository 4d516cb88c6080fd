"""What a small nightly run costs beyond its data, and what Ray Data's Parquet source adds to it: the nightly
job (embed, index, dedup, backfill, report) on a generated catalog with a tiny random model, in one Ray
session, run alternately with the product's reads (`storage.read_dataset`: Ray Data's V1 Parquet source
over the files the product has already listed) and with Ray Data's default source (V2, which lists the
files again and reads their footers on a pool of actors, a new process each). Per-stage seconds, the
median of each, and the ratio. At this size almost none of it is encoding: it is process and actor
start-up, which is also what the test suite's dozen nightly runs pay.

    python bench/bench_nightly_startup.py --rows 160 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time

import pyarrow.parquet as pq
import ray
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from item_model import ItemModel, ItemProcessor, preset_config, save_model_dir, train_tokenizer  # noqa: E402
from item_model.training import TrainConfig  # noqa: E402
from jobs.config import parse_config  # noqa: E402
from jobs.nightly import run_nightly  # noqa: E402
from pipeline import storage  # noqa: E402
from pipeline.sample_catalog import make_sample_catalog  # noqa: E402

STAGES = ("embeddings", "index", "dedup", "backfill")


def tiny_model_dir(directory: str) -> str:
    """The tiny preset, random weights, its centre and whitening fitted on sample titles and photos (as
    pretraining leaves every model dir: the dedup stage refuses vectors that all point one way)."""
    catalog = make_sample_catalog(120, seed=123)
    titles = catalog.column("title").to_pylist()
    tok = train_tokenizer(titles, vocab_size=300)
    torch.manual_seed(0)
    model = ItemModel(preset_config("tiny", tok)).eval()
    processor = ItemProcessor(tok, image_size=model.config.image_size, max_title_len=model.config.max_title_len)
    inputs = processor(titles, catalog.column("image").to_pylist())
    model.fit_embedding_space([{k: torch.from_numpy(v) for k, v in inputs.items() if k != "image_error"}],
                              whiten_shrink=TrainConfig.whiten_shrink)
    save_model_dir(model, processor, directory)
    return directory


def ray_default_read(files: list[str], filesystem, columns: list[str] | None = None) -> ray.data.Dataset:
    """The reference: the same files through Ray Data's default Parquet source."""
    ds = ray.data.read_parquet(files, filesystem=filesystem)
    return ds if columns is None else ds.select_columns(columns)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=160, help="Sample-catalog rows.")
    p.add_argument("--repeats", type=int, default=3, help="Runs per variant, alternating.")
    args = p.parse_args()
    ours = storage.read_dataset
    variants = {"product (V1 source)": ours, "Ray default (V2 source)": ray_default_read}
    names = list(variants)
    seconds: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as work:
        catalog = os.path.join(work, "catalog.parquet")
        pq.write_table(make_sample_catalog(args.rows, seed=11), catalog)
        model = tiny_model_dir(os.path.join(work, "model"))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            for i in range(args.repeats):
                for j, (name, read) in enumerate(variants.items()):
                    storage.read_dataset = read
                    config = parse_config({
                        "catalog": catalog, "model_dir": model, "output_root": os.path.join(work, f"runs-{i}-{j}"),
                        "embed": {"batch_size": 32, "encode_actors": 1, "encode_threads": 1},
                        "index": {"shards": 2, "min_recall": 0.5},
                        "dedup": {"threshold": 0.995, "calibrate_precision": 0}})
                    t0 = time.perf_counter()
                    report = run_nightly(config, dt.date(2026, 11, 20))
                    wall = time.perf_counter() - t0
                    seconds[name].append({**report["stage_seconds"], "whole run": wall})
                    print(f"{name:26s} run {i + 1}: {wall:5.1f} s  " +
                          "  ".join(f"{s} {report['stage_seconds'][s]:.1f}" for s in STAGES), flush=True)
        finally:
            storage.read_dataset = ours
            ray.shutdown()

    print(f"\nmedian seconds over {args.repeats} runs each ({args.rows} rows; load average "
          f"{os.getloadavg()[0]:.1f} at the end)")
    print(f"| stage | {names[0]} | {names[1]} | ratio |")
    print("|---|---:|---:|---:|")
    for stage in (*STAGES, "whole run"):
        a, b = (statistics.median(run[stage] for run in seconds[n]) for n in names)
        print(f"| {stage} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
