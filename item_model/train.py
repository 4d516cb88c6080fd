"""Distributed ITEm pretraining on Ray Train: catalog -> Ray Data preprocessing -> TorchTrainer -> model dir.

The only module of item_model that imports Ray. The per-step math (`build_optimizer`, `train_step`) is
plain PyTorch so that a bare loop (bench/bench_train.py) runs exactly the same code as the workers.

    driver:   tokenizer (trained on the catalog's titles, or a BERT vocab) -> staged in OUT_DIR.train/
    Ray Data: read_parquet -> TrainPreprocessor (tokenise, decode images to uint8 pixels), CPU tasks
    workers:  train_loop_per_worker: DDP model, AdamW + warm-up/cosine, reports + rank-0 checkpoints
    driver:   final checkpoint -> model dir, published atomically with a manifest of the run

Resume is Ray Train V2's: a trainer re-created with the same RunConfig(storage_path, name) starts its
workers from the latest checkpoint of that run, which is also how a crashed worker group restarts
(FailureConfig). A resumed run starts a fresh pass over the data (the position inside an epoch is not
checkpointed); model, optimizer, scheduler, step and RNG streams (seeded by seed, rank, step) are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from safetensors.torch import load_file, save_file
from ray.data import RandomSeedConfig
from transformers import PreTrainedTokenizerFast

from pipeline import storage

from .config import PRESETS, VARIANTS, ItemConfig, preset_config
from .model_dir import build_model, save_model_dir
from .modeling import ItemModel
from .processor import ItemProcessor, train_tokenizer
from .starts import NAMED_STARTS, resolve_start

RUN_NAME = "run"  # Ray Train run name inside the work dir
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "has_image")


@dataclass
class TrainConfig:
    """Everything a pretraining run needs besides the catalog and the output dir. Saved with every
    checkpoint and in the published model dir's manifest."""

    preset: str = "small"  # model preset name (item_model.config.PRESETS): tiny | small | base
    # model variant (item_model.config.VARIANTS): item | item_no_global | title_only | image_only | two_stream;
    # model_overrides apply on top of it
    variant: str = "item"
    steps: int = 1000  # optimizer steps in total (a resumed run continues up to this number)
    batch_size: int = 64  # rows per step *per worker*; the global batch is batch_size * num_workers
    lr: float = 5e-4  # peak AdamW learning rate, reached after warm-up
    # with init_from: peak lr of the parameters the start did not initialise (image stream, heads) is
    # lr x fresh_lr_scale, so a pretrained encoder fine-tunes gently while the random patch stem learns fast
    fresh_lr_scale: float = 1.0
    warmup_steps: int = 100  # linear warm-up from 0, then cosine decay to 0 at `steps`
    weight_decay: float = 0.01  # AdamW decay; biases, LayerNorms and embeddings are not decayed
    grad_clip: float = 1.0  # max global gradient norm; <= 0 disables clipping
    checkpoint_every: int = 100  # rank 0 checkpoints every N steps, and always at the last step
    report_every: int = 10  # report metrics (and print a progress line) every N steps
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU per worker; bf16 autocast on GPU, fp32 on CPU
    # CPUs reserved per worker; None = 1, or less on a small CPU-only cluster so that at least one CPU is
    # left for Ray Data's preprocessing (a trainer that holds every CPU starves its own input pipeline)
    cpus_per_worker: float | None = None
    # intra-op threads per worker; 0 = the node's cores shared among its workers (Ray sets OMP to 1, which
    # would leave a 2-core machine half idle: Ray Data's decoding is light next to the model's matmuls)
    torch_threads: int = 0
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    # a named start (item_model.starts.NAMED_STARTS, e.g. "minilm") or a local HF BERT dir with
    # model.safetensors: its vocab and weights initialise the text stream and the encoder
    init_from: str | None = None
    seed: int = 0  # seeds model init and, with (rank, step), every masking/swap draw
    vocab_size: int = 8000  # WordPiece vocab trained on the catalog's titles (ignored with init_from)
    id_column: str = "item_id"  # catalog column names (ARCHITECTURE.md: catalog contract)
    title_column: str = "title"
    image_column: str = "image"
    preprocess_batch_size: int = 256  # rows per Ray Data preprocessing task batch
    # rows of the (shuffled) training catalog whose mean vector becomes the model's embedding_center at
    # export (0: no centring): removes the direction every vector shares (see ItemModel.encode)
    center_rows: int = 2048
    # ItemConfig fields to override on the preset: objective switches and weights for ablations and
    # baselines, e.g. {"use_global_mlm": False, "use_global_mim": False} is the ViLT-style baseline
    model_overrides: dict[str, Any] = field(default_factory=dict)
    fail_at_step: int | None = None  # tests only: the last rank raises at this step, on the first attempt

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {sorted(VARIANTS)}")
        if self.init_from and self.variant == "two_stream":
            raise ValueError("init_from (BERT init) is implemented for the single-stream model only; "
                             "train the two_stream variant without --init-from")
        if self.steps < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ValueError("steps, batch_size and num_workers must be >= 1")
        if self.checkpoint_every < 1 or self.report_every < 1:
            raise ValueError("checkpoint_every and report_every must be >= 1")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be in [0, steps={self.steps})")
        if self.fresh_lr_scale <= 0 or self.center_rows < 0:
            raise ValueError("fresh_lr_scale must be > 0 and center_rows >= 0")
        named = NAMED_STARTS.get(self.init_from or "")
        if named is not None and named.preset != self.preset:
            raise ValueError(f"--init-from {self.init_from} needs --preset {named.preset} (its text geometry), "
                             f"not {self.preset}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        return cls(**d)


# Fields that may change when a run is resumed; the others shape the model or the data and must match.
RESUMABLE_CHANGES = {"steps", "center_rows", "vocab_size", "num_workers", "use_gpu", "cpus_per_worker", "torch_threads", "max_failures",
                     "checkpoint_every", "report_every", "preprocess_batch_size", "fail_at_step"}


# --- the per-step math: plain PyTorch, shared with the bare-loop benchmark --------------------------


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr_restart_step: int | None = None
                    ) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW and its schedule: linear warm-up + cosine decay to 0 at cfg.steps.

    Not decayed: biases, norms and embedding tables (a [MASK] patch, positions, words); the patch
    projection is a Linear layer and is decayed like every other weight matrix. With init_from, the
    parameters the start did not initialise learn at lr x fresh_lr_scale. `lr_restart_step`: a run
    resumed with more steps than it was trained for ramps its learning rate up again from there over
    warmup_steps instead of jumping from the end of its old schedule to the middle of the new one.
    """
    unwrapped = unwrap(model)
    no_decay = {id(m.weight) for m in unwrapped.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.LayerNorm))}
    from_start = cfg.init_from is not None and isinstance(unwrapped, ItemModel)
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in unwrapped.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and id(p) not in no_decay
        fresh = from_start and not name.startswith(ItemModel.BERT_PARAMETERS)
        groups.setdefault((decay, fresh), []).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
          "lr": cfg.lr * (cfg.fresh_lr_scale if fresh else 1.0)}
         for (decay, fresh), params in sorted(groups.items())],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg, restart=lr_restart_step))


def lr_factor(step: int, cfg: TrainConfig, restart: int | None = None) -> float:
    """The share of the peak lr at `step`: warm-up, cosine to 0 at cfg.steps, times a second warm-up from
    `restart` (a run extended on resume)."""
    if step < cfg.warmup_steps:
        factor = step / max(1, cfg.warmup_steps)
    else:
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        factor = max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
    if restart is not None and step >= restart:
        factor *= min(1.0, (step - restart + 1) / max(1, cfg.warmup_steps))
    return factor


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU; fp32 (no autocast) on CPU, where bf16 matmuls are slow on most cores."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    grad_clip: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One optimizer step on `batch` (model inputs, on the model's device). Returns the named losses,
    detached (no host sync here: callers decide when to read them)."""
    device = batch["input_ids"].device
    with autocast(device):
        losses = model(**{k: batch[k] for k in MODEL_INPUTS}, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return {k: v.detach().float() for k, v in losses.items()}


def step_generator(device: torch.device, seed: int, rank: int, step: int) -> torch.Generator:
    """The RNG of one step on one rank: reproducible across restarts, different across ranks."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)
    return g


# --- preprocessing: a callable class for Ray Data's map_batches, testable on a plain dict ------------


class TrainPreprocessor:
    """Catalog rows -> model inputs (numpy), plus `keep`: False for rows that cannot train.

    A row is skipped (kept in the batch with keep=False, counted by the trainers) when its id is null or
    it has neither a title nor a usable image. An unusable image on a row with a title only loses the
    image. Rows are flagged rather than dropped here so that the skip count survives streaming.
    """

    def __init__(self, processor: ItemProcessor, id_column: str, title_column: str, image_column: str) -> None:
        self.processor = processor
        self.columns = (id_column, title_column, image_column)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, titles, images = (batch[c] for c in self.columns)
        titles = [t if isinstance(t, str) else None for t in titles]
        out = self.processor(titles, [im if im is not None and len(im) else None for im in images])
        has_title = np.array([bool(t and t.strip()) for t in titles], dtype=bool)
        has_id = np.array([i is not None and not (isinstance(i, float) and math.isnan(i)) for i in ids], dtype=bool)
        return {
            "input_ids": out["input_ids"],
            "attention_mask": out["attention_mask"],
            "pixel_values": out["pixel_values"],
            "has_image": out["has_image"],
            "keep": has_id & (has_title | out["has_image"]),
        }


def check_catalog_schema(catalog_uri: str, cfg: TrainConfig) -> None:
    """Fail before any work when a required column is missing or has the wrong type."""
    import pyarrow as pa

    schema = ray.data.read_parquet(catalog_uri).schema()
    names = list(schema.names)
    types = dict(zip(names, schema.types))
    wanted = {cfg.id_column: None, cfg.title_column: pa.types.is_string, cfg.image_column: pa.types.is_binary}
    for column, is_type in wanted.items():
        if column not in types:
            raise ValueError(f"catalog {catalog_uri} has no column {column!r} (columns: {names}); "
                             "map it with --id-column / --title-column / --image-column")
        t = types[column]
        if is_type and not (is_type(t) or pa.types.is_large_string(t) or pa.types.is_large_binary(t)):
            raise ValueError(f"catalog column {column!r} is {t}; expected "
                             f"{'string' if is_type is pa.types.is_string else 'binary (encoded image bytes)'}")


def build_dataset(catalog_uri: str, processor: ItemProcessor, cfg: TrainConfig, attempt: int = 0) -> ray.data.Dataset:
    """The training dataset: read only the needed columns in a seeded random order, preprocess on CPU
    tasks, stream to trainers.

    Every pass over the data (epoch) gets a new order (Ray's reseed per execution), and so does every
    `attempt` (a --resume re-creates the dataset, whose execution count starts again at 0): batches and
    ITM negatives never repeat a previous pass's."""
    columns = [cfg.id_column, cfg.title_column, cfg.image_column]
    # An instance, not the class: Ray Data runs it as stateless tasks fused with the read (one task
    # per block reads and decodes). The processor holds only a tokenizer, cheap to ship per task, and
    # tasks never pin CPUs the way an actor pool does, which on a small machine would starve the read.
    preprocess = TrainPreprocessor(processor, cfg.id_column, cfg.title_column, cfg.image_column)
    # Catalogs are often sorted (by id, by category): a short run over the file's order would see a few
    # categories only. Shuffle the raw rows (small: encoded bytes) with the run's seed, before decoding.
    seed = RandomSeedConfig(seed=cfg.seed * 1_000_003 + attempt, reseed_after_execution=True)
    rows = ray.data.read_parquet(catalog_uri, columns=columns).random_shuffle(seed=seed)
    return rows.map_batches(preprocess, batch_size=cfg.preprocess_batch_size, batch_format="numpy")


def iter_titles(catalog_uri: str, column: str) -> Iterator[str]:
    """Stream the title column only (for tokenizer training)."""
    for batch in ray.data.read_parquet(catalog_uri, columns=[column]).iter_batches(batch_size=4096, batch_format="pyarrow"):
        yield from (t for t in batch.column(column).to_pylist() if t)


# --- checkpoints ------------------------------------------------------------------------------------


def unwrap(model: torch.nn.Module) -> ItemModel:
    return model.module if hasattr(model, "module") else model


def save_checkpoint(directory: str, model: torch.nn.Module, optimizer, scheduler, state: dict[str, Any]) -> None:
    """model.safetensors + optimizer/scheduler state (tensors only, loaded with weights_only) + state.json."""
    weights = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(weights, os.path.join(directory, "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(directory, "optim.pt"))
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump(state, f)


def load_checkpoint(directory: str, model: torch.nn.Module, optimizer=None, scheduler=None) -> dict[str, Any]:
    """Restore what save_checkpoint wrote; returns the state dict (step, history, counters, config)."""
    unwrap(model).load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
    if optimizer is not None:
        optim = torch.load(os.path.join(directory, "optim.pt"), weights_only=True, map_location="cpu")
        optimizer.load_state_dict(optim["optimizer"])
        scheduler.load_state_dict(optim["scheduler"])
    return checkpoint_state(directory)


def checkpoint_state(directory: str) -> dict[str, Any]:
    """The state.json of a checkpoint: step, history, counters, the run's TrainConfig."""
    with open(os.path.join(directory, "state.json")) as f:
        return json.load(f)


# --- the loop each Ray Train worker runs ------------------------------------------------------------


def format_progress(step: int, steps: int, losses: dict[str, float], samples_per_s: float, eta_s: float) -> str:
    terms = " ".join(f"{k} {v:.3f}" for k, v in losses.items() if k != "loss")
    eta = time.strftime("%H:%M:%S", time.gmtime(max(0.0, eta_s))) if math.isfinite(eta_s) else "?"
    return (f"step {step}/{steps} | loss {losses.get('loss', float('nan')):.4f} ({terms}) | "
            f"{samples_per_s:.1f} samples/s | ETA {eta}")


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point. `config` = {"train": TrainConfig dict, "model": ItemConfig dict,
    "init_state": optional ObjectRef of initial weights}. Returns (rank 0) the run's history."""
    cfg = TrainConfig.from_dict(config["train"])
    model_config = ItemConfig.from_dict(config["model"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.torch_threads or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = build_model(model_config)  # ItemModel, or TwoStreamModel for the two_stream variant
    if config.get("init_state") is not None:
        model.load_state_dict(ray.get(config["init_state"]))
    model.to(device)
    state: dict[str, Any] = {"step": 0, "history": [], "rows_seen": 0, "rows_skipped": 0, "samples": 0,
                             "resumed_from": [], "lr_restart_step": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = checkpoint_state(d)
            # a run resumed with more steps than it was trained for warms its lr up again from here
            restart = saved["step"] if saved["train_config"]["steps"] < cfg.steps else saved.get("lr_restart_step")
            optimizer, scheduler = build_optimizer(model, cfg, restart)
            state = {**load_checkpoint(d, model, optimizer, scheduler), "lr_restart_step": restart}
        state.pop("train_config", None)
    else:
        optimizer, scheduler = build_optimizer(model, cfg)
    resumed = checkpoint is not None
    if resumed:
        state.setdefault("resumed_from", []).append(state["step"])  # a restart or a --resume
    state["torch_threads"] = torch.get_num_threads()  # per worker, recorded in the model dir's manifest
    # heads of switched-off objectives get no gradient: DDP must be told to expect that
    all_on = all(getattr(model_config, f"use_{o}") for o in ("itm", "mlm", "mim", "global_mlm", "global_mim"))
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": not all_on})
    model.train()

    shard = ray.train.get_dataset_shard("train")
    window: dict[str, torch.Tensor] = {}  # summed losses since the last report
    window_steps, window_samples, window_rows, window_skipped = 0, 0, 0, 0
    t_window = time.perf_counter()
    t_start = time.perf_counter()
    start_step = state["step"]

    while state["step"] < cfg.steps:
        batches_this_pass = 0
        # batches arrive on the CPU: skipped rows are dropped and counted there, with no device sync
        for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, drop_last=True, device="cpu"):
            batches_this_pass += 1
            keep = batch.pop("keep")
            window_rows += keep.numel()
            skipped = int((~keep).sum())
            window_skipped += skipped
            batch = {k: (v[keep] if skipped else v).to(device, non_blocking=True) for k, v in batch.items()}
            step = state["step"]
            if cfg.fail_at_step is not None and step == cfg.fail_at_step and not resumed and rank == world - 1:
                raise RuntimeError(f"injected failure at step {step} (TrainConfig.fail_at_step, first attempt only)")
            gen = step_generator(device, cfg.seed, rank, step)
            losses = train_step(model, batch, optimizer, scheduler, cfg.grad_clip, gen)
            for k, v in losses.items():
                window[k] = window.get(k, 0.0) + v
            window_steps += 1
            window_samples += int(batch["input_ids"].shape[0])
            state["step"] = step = step + 1

            last = step == cfg.steps
            do_checkpoint = step % cfg.checkpoint_every == 0 or last
            if not (step % cfg.report_every == 0 or do_checkpoint):
                continue
            # one all-reduce per report: every rank's losses and counters, summed
            keys = sorted(window)
            packed = torch.stack([window[k] for k in keys] + [torch.tensor(float(x), device=device) for x in
                                 (window_steps, window_samples, window_rows, window_skipped)])
            if world > 1:
                torch.distributed.all_reduce(packed)
            values = packed.tolist()
            n_steps = values[len(keys)]
            metrics = {k: values[i] / n_steps for i, k in enumerate(keys)}
            elapsed = time.perf_counter() - t_window
            samples_per_s = values[len(keys) + 1] / elapsed
            state["samples"] += int(values[len(keys) + 1])
            state["rows_seen"] += int(values[len(keys) + 2])
            state["rows_skipped"] += int(values[len(keys) + 3])
            steps_per_s = (step - start_step) / (time.perf_counter() - t_start)
            eta_s = (cfg.steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
            record = {"step": step, **metrics, "samples_per_s": samples_per_s, "samples": state["samples"],
                      "time": time.time(),
                      "lr": scheduler.get_last_lr()[0]}
            state["history"].append(record)
            report = {**record, "rows_seen": state["rows_seen"], "rows_skipped": state["rows_skipped"],
                      "eta_s": eta_s}
            if rank == 0:
                # sys.stdout, not print: Ray Train V2 patches print to log *and* echo, which doubles each line
                sys.stdout.write(format_progress(step, cfg.steps, metrics, samples_per_s, eta_s) + "\n")
                sys.stdout.flush()
            if do_checkpoint and rank == 0:
                with tempfile.TemporaryDirectory() as tmp:
                    save_checkpoint(tmp, model, optimizer, scheduler, {**state, "train_config": cfg.to_dict()})
                    ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                     checkpoint_dir_name=f"step_{step:08d}")
            else:
                ray.train.report(report)
            window, window_steps, window_samples, window_rows, window_skipped = {}, 0, 0, 0, 0
            t_window = time.perf_counter()
            if last:
                break
        if batches_this_pass == 0:
            raise ValueError(
                f"worker {rank} got no full batch in a pass over the catalog: it has fewer than "
                f"batch_size x workers = {cfg.batch_size * world} usable rows; lower --batch-size")
    return state


def fit_center(model: ItemModel, dataset: ray.data.Dataset, rows: int, batch_size: int = 128) -> int:
    """Fit the model's embedding_center on the first `rows` usable rows of the (shuffled) training
    dataset, on the driver's CPU; returns the rows used (0: centring off, or a two-stream model)."""
    if rows == 0 or not hasattr(model, "fit_embedding_center"):
        return 0
    torch.set_num_threads(os.cpu_count() or 1)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for batch in dataset.limit(rows).iter_torch_batches(batch_size=batch_size, device="cpu"):
            keep = batch.pop("keep")
            if keep.any():
                yield {k: v[keep] for k, v in batch.items()}

    return model.eval().fit_embedding_center(batches())


# --- the driver side ----------------------------------------------------------------------------------


def build_trainer(
    dataset: ray.data.Dataset,
    model_config: ItemConfig,
    cfg: TrainConfig,
    storage_path: str,
    name: str = RUN_NAME,
    init_state: Any = None,
) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer of a run: resources, failure handling and checkpoint retention decided here."""
    if cfg.cpus_per_worker is None:
        spare = ray.cluster_resources().get("CPU", 1.0) - 1.0  # one CPU stays with Ray Data
        cpus = 1.0 if cfg.use_gpu else max(0.25, min(1.0, spare / cfg.num_workers))
        cfg = dataclasses.replace(cfg, cpus_per_worker=cpus)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.to_dict(), "model": model_config.to_dict(), "init_state": init_state},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            storage_path=os.path.abspath(storage_path),
            name=name,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )


def work_dir_for(out_dir: str) -> str:
    """Where a run keeps its tokenizer, its Ray Train checkpoints and its config: beside the model dir."""
    return out_dir.rstrip("/") + ".train"


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig) -> None:
    changed = sorted(k for k, v in cfg.to_dict().items()
                     if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ValueError(f"--resume with different settings ({detail}); resume with the original ones, "
                         "or start a new run with --overwrite")


def pretrain(catalog_uri: str, out_dir: str, cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> str:
    """Train an ITEm model on a catalog and publish it as a model dir at `out_dir`; returns its model_version.

    Ray must already be initialised (library functions never call ray.init). `resume` continues the run
    kept in `out_dir`.train/ from its latest checkpoint (a finished, published run is left as it is);
    `overwrite` discards a previous run and its published model dir.
    """
    cfg.check()
    if not storage.is_local(out_dir):
        raise ValueError(f"{out_dir}: pretrain writes to a local (or shared-filesystem) directory; "
                         "copy the model dir to object storage afterwards")
    out_dir = os.path.abspath(out_dir)
    work = work_dir_for(out_dir)
    run_path = os.path.join(work, RUN_NAME)
    cfg_path = os.path.join(work, "train_config.json")

    if resume:
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"nothing to resume: {work} holds no run; start one without --resume")
        _check_resume_config(storage.read_json(cfg_path), cfg)
        if storage.is_published(out_dir):
            manifest = storage.read_manifest(out_dir)
            if manifest.get("steps") == cfg.steps:
                print(f"{out_dir} is already trained to step {cfg.steps} (model_version "
                      f"{manifest['model_version']}): nothing to do", flush=True)
                return manifest["model_version"]
        overwrite = True  # the published dir (if any) is from this run, trained to fewer steps
    else:
        if os.path.exists(work) and not overwrite:
            raise FileExistsError(f"{work} holds a previous run: pass --resume to continue it, "
                                  "or --overwrite to start again")
        storage.check_can_publish(out_dir, overwrite)
        shutil.rmtree(work, ignore_errors=True)

    check_catalog_schema(catalog_uri, cfg)
    start = resolve_start(cfg.init_from) if cfg.init_from else None  # verified before any work
    # tokenizer: the run's own (resume), a BERT vocab (init_from), or trained on the catalog's titles
    processor_dir = os.path.join(work, "processor")
    shape = {**PRESETS[cfg.preset], **cfg.model_overrides}
    image_size, max_title_len = shape["image_size"], shape["max_title_len"]
    if resume:
        processor = ItemProcessor.from_pretrained(processor_dir)
    else:
        if cfg.init_from:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(start.path, local_files_only=True)
        else:
            t0 = time.perf_counter()
            tokenizer = train_tokenizer(iter_titles(catalog_uri, cfg.title_column), vocab_size=cfg.vocab_size)
            print(f"trained a {len(tokenizer)}-token WordPiece vocab on the catalog titles "
                  f"in {time.perf_counter() - t0:.1f}s", flush=True)
        processor = ItemProcessor(tokenizer, image_size=image_size, max_title_len=max_title_len)
        os.makedirs(work, exist_ok=True)
        processor.save_pretrained(processor_dir)
        storage.write_json(cfg_path, cfg.to_dict())
    attempts = pathlib.Path(work, "attempts")  # each attempt (a --resume) shuffles anew: build_dataset
    attempt = int(attempts.read_text()) + 1 if attempts.exists() else 0
    attempts.write_text(str(attempt))
    model_config = preset_config(cfg.preset, processor.tokenizer, variant=cfg.variant, **cfg.model_overrides)

    init_state = None
    if cfg.init_from:  # used only when the run has no checkpoint yet
        torch.manual_seed(cfg.seed)
        model = ItemModel(model_config)
        model.init_from_bert(start.path)
        init_state = ray.put(model.state_dict())

    t0 = time.perf_counter()
    trainer = build_trainer(build_dataset(catalog_uri, processor, cfg, attempt), model_config, cfg, work,
                            init_state=init_state)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint in {run_path}")
    train_s = time.perf_counter() - t0

    # export: the final checkpoint's weights -> a complete model dir, published atomically
    model = build_model(model_config)
    with result.checkpoint.as_directory() as d:
        state = load_checkpoint(d, model)
    if state["step"] != cfg.steps:
        raise RuntimeError(f"the latest checkpoint is at step {state['step']}, expected {cfg.steps}")
    center_rows = fit_center(model, build_dataset(catalog_uri, processor, cfg), cfg.center_rows)
    with storage.staging(out_dir) as stage:
        version = save_model_dir(model, processor, stage)
        history = state["history"]
        manifest = {
            "model_version": version,
            "preset": cfg.preset,
            "steps": state["step"],
            "samples": state["samples"],
            "rows_seen": state["rows_seen"],
            "rows_skipped": state["rows_skipped"],
            "resumed_from_steps": state.get("resumed_from", []),
            "torch_threads_per_worker": state.get("torch_threads"),
            "history": history,
            "final_losses": {k: v for k, v in history[-1].items() if k not in ("step", "time", "lr", "samples_per_s", "samples")}
            if history else {},
            "train_seconds_this_attempt": round(train_s, 1),
            "start": start.to_dict() if start else {"name": "random", "seed": cfg.seed},
            "embedding_center_rows": center_rows,
            "catalog": catalog_uri,
            "train_config": cfg.to_dict(),
        }
        storage.publish(stage, out_dir, manifest, overwrite=overwrite)
    return version
