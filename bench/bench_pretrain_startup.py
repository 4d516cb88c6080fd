"""Where a tiny pretraining run's time goes: the whole `pipeline.pretrain.pretrain` call of a few steps on a
small generated catalog, with each log line time-stamped from the start of the call, so the engine's
start-up (Ray Train's controller and worker group, Ray Data's coordinators) stands apart from the steps.
It is what the test suite's 4-step pretrains cost.

    python bench/bench_pretrain_startup.py --rows 240 --steps 4
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import ray

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from item_model.training import TrainConfig  # noqa: E402
from pipeline.pretrain import pretrain  # noqa: E402
from pipeline.sample_catalog import write_sample_catalog  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=240, help="Sample-catalog rows.")
    p.add_argument("--steps", type=int, default=4, help="Optimizer steps (tiny preset, batch 16, 1 worker).")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        catalog = os.path.join(work, "catalog.parquet")
        write_sample_catalog(catalog, args.rows, seed=0)
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(f"ray.init: {time.perf_counter() - t0:.1f} s", flush=True)
        handler = logging.StreamHandler(sys.stdout)
        start = time.perf_counter()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(lambda r: setattr(r, "msg", f"{time.perf_counter() - start:6.1f} s  {r.msg}") or True)
        logging.getLogger("pipeline.pretrain").addHandler(handler)
        logging.getLogger("pipeline.pretrain").setLevel(logging.INFO)
        cfg = TrainConfig(preset="tiny", steps=args.steps, batch_size=16, lr=3e-3, warmup_steps=1,
                          checkpoint_every=args.steps, report_every=max(1, args.steps // 2), num_workers=1,
                          cpus_per_worker=0.5, vocab_size=500, preprocess_batch_size=64)
        pretrain(catalog, os.path.join(work, "model"), cfg)
        print(f"{time.perf_counter() - start:6.1f} s  pretrain returned (model dir published)", flush=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
