"""Benchmark: ITEm pretraining throughput of the Ray Train loop against a bare PyTorch loop, same batches.

Both loops run the same `item_model.training.train_step` (same optimizer, schedule, clipping, autocast) on
the same preprocessed rows, materialised once by the Ray Data preprocessing pipeline:

  bare     the driver process iterates a list of those batches (already in memory) and calls
           train_step; no Ray in the loop.
  ray      a 1-worker TorchTrainer runs `train_loop_per_worker` over the same materialised dataset
           (streamed to the worker from the object store), with its usual per-report all-reduce,
           ray.train.report and progress line, and a final rank-0 checkpoint (outside the timed window).

Throughput is steady state: samples trained between the end of the warm-up and the last step, divided by
the wall time in between, measured inside each loop. Torch intra-op threads are set to the same number in
both (Ray sets OMP_NUM_THREADS=1 in workers; the loop sets torch threads explicitly from --threads).

    python bench/bench_train.py --preset small --steps 40 --warmup 10 --batch-size 32 --threads 1 --rounds 2
    python bench/bench_train.py --preset base --gpu --steps 100 --batch-size 64   # prints bf16 MFU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import ray
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from item_model import MODEL_INPUTS, ItemModel, ItemProcessor, preset_config, train_tokenizer  # noqa: E402
from item_model.presets import PRESETS  # noqa: E402
from item_model.training import TrainConfig, build_optimizer, step_generator, train_step  # noqa: E402
from pipeline.pretrain import build_dataset, build_trainer, iter_titles  # noqa: E402
from pipeline.sample_catalog import write_sample_catalog  # noqa: E402

# dense bf16 peak of the GPUs we rent, for MFU (tensor cores, no sparsity)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 70.0}


def bare_loop(batches: list[dict[str, torch.Tensor]], model_config, cfg: TrainConfig, device: torch.device,
              warmup: int) -> float:
    """samples/s of the plain loop after `warmup` steps."""
    torch.manual_seed(cfg.seed)
    model = ItemModel(model_config).to(device).train()
    optimizer, scheduler = build_optimizer(model, cfg)
    samples, t0 = 0, None
    for step in range(cfg.steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, samples = time.perf_counter(), 0
        batch = batches[step % len(batches)]
        keep = batch["keep"]
        batch = {k: (batch[k][keep] if not keep.all() else batch[k]).to(device, non_blocking=True) for k in MODEL_INPUTS}
        losses = train_step(model, batch, optimizer, scheduler, cfg.grad_clip,
                            step_generator(device, cfg.seed, 0, step))
        samples += int(batch["input_ids"].shape[0])
    losses["loss"].item()  # the last step has finished (GPU)
    return samples / (time.perf_counter() - t0)


def ray_loop(dataset, model_config, cfg: TrainConfig, warmup: int, storage: str) -> float:
    """samples/s of the Ray Train loop after `warmup` steps, from the loop's own report records."""
    result = build_trainer(dataset, model_config, cfg, storage, name="bench").fit()
    history = result.return_value["history"]
    start = next(h for h in history if h["step"] >= warmup)
    end = history[-1]
    return (end["samples"] - start["samples"]) / (end["time"] - start["time"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model preset")
    ap.add_argument("--gpu", action="store_true", help="train on one GPU in bf16 autocast and report MFU")
    ap.add_argument("--steps", type=int, default=40, help="steps per loop, warm-up included")
    ap.add_argument("--warmup", type=int, default=10, help="steps excluded from the timing (a report boundary)")
    ap.add_argument("--batch-size", type=int, default=32, help="rows per step")
    ap.add_argument("--rows", type=int, default=512, help="rows of the generated sample catalog")
    ap.add_argument("--rounds", type=int, default=2, help="alternating bare/ray rounds; best of each is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in both loops")
    ap.add_argument("--catalog", default=None, help="use this catalog instead of a generated one")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU bf16 peak for MFU (default: by name)")
    args = ap.parse_args()

    if not ray.is_initialized():
        # the trainer takes --threads CPUs; one more keeps the data side (split coordinator) off its core
        ray.init(num_cpus=None if args.gpu else args.threads + 1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    catalog = args.catalog or os.path.join(tmp, "catalog.parquet")
    if not args.catalog:
        write_sample_catalog(catalog, args.rows, seed=0)

    cfg = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size, warmup_steps=5,
                      checkpoint_every=args.steps, report_every=10, num_workers=1, use_gpu=args.gpu,
                      cpus_per_worker=float(args.threads), torch_threads=args.threads, vocab_size=8000)
    shape = PRESETS[args.preset]
    tokenizer = train_tokenizer(iter_titles(catalog, "title"), vocab_size=cfg.vocab_size)
    processor = ItemProcessor(tokenizer, shape["image_size"], shape["max_title_len"])
    model_config = preset_config(args.preset, tokenizer)

    # the same preprocessed rows for both loops, materialised once
    t0 = time.perf_counter()
    dataset = build_dataset(catalog, processor, cfg).materialize()
    batches = list(dataset.iter_torch_batches(batch_size=args.batch_size, drop_last=True, device="cpu"))
    prep_s = time.perf_counter() - t0

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    # alternate the loops: on a shared machine the load drifts, and best-of-N per loop is the least noisy
    rounds: list[tuple[float, float]] = []
    for r in range(args.rounds):
        bare_r = bare_loop(batches, model_config, cfg, device, args.warmup)
        ray_r = ray_loop(dataset, model_config, cfg, args.warmup, os.path.join(tmp, f"ray{r}"))
        print(f"round {r + 1}: bare {bare_r:.1f} samples/s, ray {ray_r:.1f} samples/s", flush=True)
        rounds.append((bare_r, ray_r))
    bare, with_ray = max(b for b, _ in rounds), max(r for _, r in rounds)

    params = sum(p.numel() for p in ItemModel(model_config).parameters())
    tokens = model_config.max_title_len + model_config.num_patches
    print(f"\npreset {args.preset} ({params / 1e6:.1f}M params, {tokens} tokens/sample), batch {args.batch_size}, "
          f"{'GPU ' + torch.cuda.get_device_name() if args.gpu else 'CPU'}, torch threads {args.threads}, "
          f"{args.steps} steps ({args.warmup} warm-up), {dataset.count()} preprocessed rows in {prep_s:.1f}s\n")
    per_round = lambda i: ", ".join(f"{r[i]:.1f}" for r in rounds)  # noqa: E731
    print("| loop | samples/s (best) | per round |\n|---|---|---|")
    print(f"| bare PyTorch (same train_step, batches in memory) | {bare:.1f} | {per_round(0)} |")
    print(f"| Ray Train, 1 worker (Ray Data shard, reports) | {with_ray:.1f} | {per_round(1)} |")
    print(f"\nratio Ray Train / bare = {with_ray / bare:.3f} (target >= 0.9)")
    if args.gpu:
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        flops_per_sample = 6 * params * tokens  # forward + backward, dense approximation
        if peak:
            for label, rate in (("bare", bare), ("ray", with_ray)):
                print(f"bf16 MFU {label}: {flops_per_sample * rate / (peak * 1e12):.1%} (peak {peak:.0f} TFLOPS)")
        else:
            print(f"unknown peak for {name}: pass --peak-tflops to get MFU")


if __name__ == "__main__":
    main()
