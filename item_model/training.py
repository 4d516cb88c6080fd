"""Pretraining maths and state, plain PyTorch: the run's config, the optimizer and its schedule, one step,
the RNG of a step, checkpoints and the progress line. No Ray: the Ray Train entry point
(pipeline/pretrain.py) and the bare-loop benchmark (bench/bench_train.py) run exactly this code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .modeling import ItemModel, check_whiten_shrink
from .presets import PRESETS, VARIANTS
from .processor import MODEL_INPUTS
from .starts import NAMED_STARTS


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
    # with init_from: the parameters the start initialised stay fixed (lr 0) for the first N steps, so the
    # fresh ones (patch stem, heads) first learn against a text encoder that does not move; then the start's
    # parameters warm up from 0 over warmup_steps and follow the schedule. None: 20% of `steps` with a start
    # (the recipe measured best, docs/evaluation.md run 12), 0 without one
    start_frozen_steps: int | None = None
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
    # catalog column names that differ from the contract's (ARCHITECTURE.md), as pipeline.catalog.ColumnMap
    # fields: e.g. {"item_id": "sku", "title": "name"}
    columns: dict[str, str] = field(default_factory=dict)
    preprocess_batch_size: int = 256  # rows per Ray Data preprocessing task batch
    # rows of the (shuffled) training catalog whose mean vector becomes the model's embedding_center at
    # export (0: no centring): removes the direction every vector shares (see ItemModel.encode)
    center_rows: int = 2048
    # with centring, the same rows also fit a partial whitening of the centred vectors (ItemModel.
    # fit_embedding_space): each principal direction scaled by 1/sqrt(variance + whiten_shrink x the mean
    # variance); None: centring only. 1 lifted category k-NN by 0.05-0.06 and re-listings by 0.006-0.030 on
    # three splits (docs/evaluation.md, run 12w)
    whiten_shrink: float | None = 1.0
    # ItemConfig fields to override on the preset: objective switches and weights for ablations and
    # baselines, e.g. {"use_global_mlm": False, "use_global_mim": False} is the ViLT-style baseline
    model_overrides: dict[str, Any] = field(default_factory=dict)
    fail_at_step: int | None = None  # tests only: the last rank raises at this step, on the first attempt

    def __post_init__(self) -> None:
        if self.start_frozen_steps is None:
            self.start_frozen_steps = self.steps // 5 if self.init_from else 0

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
        check_whiten_shrink(self.whiten_shrink)
        if self.start_frozen_steps and (not self.init_from or not 0 < self.start_frozen_steps < self.steps):
            raise ValueError(f"start_frozen_steps ({self.start_frozen_steps}) needs init_from (a start to hold) and "
                             f"must be in [0, steps={self.steps})")
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


def parse_whiten_shrink(text: str) -> float | None:
    """'EPS' or 'none' (the --whiten-shrink of the CLI and the benches) -> TrainConfig.whiten_shrink."""
    if text.strip().lower() == "none":
        return None
    try:
        eps = float(text)
    except ValueError:
        eps = math.nan
    if not eps > 0:
        raise ValueError(f"expects a number > 0 or 'none', got {text!r}")
    return eps


# Fields that may change when a run is resumed; the others shape the model or the data and must match.
RESUMABLE_CHANGES = {"steps", "center_rows", "whiten_shrink", "vocab_size", "num_workers", "use_gpu", "cpus_per_worker",
                     "torch_threads", "max_failures", "checkpoint_every", "report_every", "preprocess_batch_size", "fail_at_step"}


# --- the per-step math --------------------------------------------------------------------------------


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
    keys = sorted(groups)
    optimizer = torch.optim.AdamW(
        [{"params": groups[decay, fresh], "weight_decay": cfg.weight_decay if decay else 0.0,
          "lr": cfg.lr * (cfg.fresh_lr_scale if fresh else 1.0)}
         for decay, fresh in keys],
        lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    schedules = [partial(lr_factor, cfg=cfg, restart=lr_restart_step,
                         frozen_until=0 if fresh or not from_start else cfg.start_frozen_steps)
                 for _, fresh in keys]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)


def lr_factor(step: int, cfg: TrainConfig, restart: int | None = None, frozen_until: int = 0) -> float:
    """The share of the peak lr at `step`: warm-up, cosine to 0 at cfg.steps, times a second warm-up from
    `restart` (a run extended on resume); 0 before `frozen_until`, then a warm-up from there (the start's
    parameters while cfg.start_frozen_steps hold them)."""
    if step < frozen_until:
        return 0.0
    if frozen_until and step < frozen_until + cfg.warmup_steps:
        return lr_factor(step, cfg, restart) * (step - frozen_until + 1) / max(1, cfg.warmup_steps)
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


def format_progress(step: int, steps: int, losses: dict[str, float], samples_per_s: float, eta_s: float) -> str:
    terms = " ".join(f"{k} {v:.3f}" for k, v in losses.items() if k != "loss")
    eta = time.strftime("%H:%M:%S", time.gmtime(max(0.0, eta_s))) if math.isfinite(eta_s) else "?"
    return (f"step {step}/{steps} | loss {losses.get('loss', float('nan')):.4f} ({terms}) | "
            f"{samples_per_s:.1f} samples/s | ETA {eta}")
