"""Distributed ITEm pretraining on Ray Train: catalog -> Ray Data row preparation -> TorchTrainer -> model dir.

The training entry point: the only code that uses Ray Train. The per-step maths, the config and the
checkpoints are plain PyTorch in item_model/training.py, which the bare-loop benchmark runs too.

    driver:   tokenizer (trained on the catalog's titles, or a BERT vocab) -> staged in OUT_DIR.train/
    Ray Data: catalog.read_rows -> shuffle -> rows.TrainRows (the embed job's row preparation), CPU tasks
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
import logging
import os
import pathlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.data import RandomSeedConfig
from transformers import PreTrainedTokenizerFast

from item_model import ItemConfig, ItemModel, ItemProcessor, build_model, preset_config, save_model_dir
from item_model import train_tokenizer
from item_model.presets import PRESETS
from item_model.starts import resolve_start
from item_model.training import (
    RESUMABLE_CHANGES, TrainConfig, build_optimizer, checkpoint_state, format_progress, load_checkpoint,
    save_checkpoint, step_generator, train_step,
)

from . import storage
from .catalog import ColumnMap, open_dataset, read_rows, validate_schema
from .encode import autocast, resolve_precision
from .rows import TrainRows

RUN_NAME = "run"  # Ray Train run name inside the work dir
log = logging.getLogger(__name__)


# --- the training data: the embed job's row preparation, kept to the model inputs (rows.TrainRows) ----


def build_dataset(catalog_uri: str, processor: ItemProcessor, cfg: TrainConfig, attempt: int = 0) -> ray.data.Dataset:
    """The training dataset: read only the needed columns in a seeded random order, prepare rows on CPU
    tasks, stream to trainers.

    Every pass over the data (epoch) gets a new order (Ray's reseed per execution), and so does every
    `attempt` (a --resume re-creates the dataset, whose execution count starts again at 0): batches and
    ITM negatives never repeat a previous pass's."""
    columns = ColumnMap(**cfg.columns)
    _, needed = validate_schema(catalog_uri, columns)
    # An instance, not the class: Ray Data runs it as stateless tasks fused with the shuffle's output. The
    # processor holds only a tokenizer, cheap to ship per task, and tasks never pin CPUs the way an actor
    # pool does, which on a small machine would starve the read.
    # Catalogs are often sorted (by id, by category): a short run over the file's order would see a few
    # categories only. Shuffle the raw rows (small: encoded bytes) with the run's seed, before decoding.
    seed = RandomSeedConfig(seed=cfg.seed * 1_000_003 + attempt, reseed_after_execution=True)
    rows = read_rows(catalog_uri, needed).random_shuffle(seed=seed)
    ds = rows.map_batches(TrainRows(processor, columns), batch_size=cfg.preprocess_batch_size, batch_format="pyarrow")
    # One seed, one order: the shuffle's blocks leave in their order, not in the order their tasks finish
    ds.context.execution_options.preserve_order = True
    return ds


def fit_sample(catalog_uri: str, processor: ItemProcessor, cfg: TrainConfig) -> ray.data.Dataset:
    """The rows the export fits the published vector's centre and whitening on: a seeded random sample of
    about 1.5 x cfg.center_rows catalog rows (fit_embedding_space keeps the first center_rows usable ones),
    read in one streamed pass. Unlike the training dataset, no shuffle moves the whole catalog for them."""
    columns = ColumnMap(**cfg.columns)
    _, needed = validate_schema(catalog_uri, columns)
    fraction = min(1.0, 1.5 * cfg.center_rows / max(1, open_dataset(catalog_uri).count_rows()))  # the footers
    rows = read_rows(catalog_uri, needed)
    if 0 < fraction < 1.0:
        rows = rows.random_sample(fraction, seed=cfg.seed)
    return rows.map_batches(TrainRows(processor, columns), batch_size=cfg.preprocess_batch_size,
                            batch_format="pyarrow")


def iter_titles(catalog_uri: str, column: str) -> Iterator[str]:
    """Stream the title column only, for the tokenizer the driver trains: pyarrow batches straight from the
    catalog's files (the same files as read_rows), since a Ray Data job would only hand them to this one
    consumer, after its own start-up."""
    for batch in open_dataset(catalog_uri).to_batches(columns=[column], batch_size=4096):
        yield from (t for t in batch.column(0).to_pylist() if t)


# --- the loop each Ray Train worker runs -----------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point. `config` = {"train": TrainConfig dict, "model": ItemConfig dict,
    "init_state": optional ObjectRef of initial weights, "progress_path": the file rank 0 appends a line to
    per report}. Returns (rank 0) the run's history."""
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
                # a line per report into the run's progress file, which the driver echoes (worker output
                # itself is the engine's business: it reaches the terminal only with log_to_driver)
                with open(config["progress_path"], "a") as f:
                    f.write(format_progress(step, cfg.steps, metrics, samples_per_s, eta_s) + "\n")
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


def fit_embedding_space(model: ItemModel, dataset: ray.data.Dataset, rows: int, whiten_shrink: float | None,
                        batch_size: int = 128) -> int:
    """Fit the model's embedding centre and whitening (ItemModel.fit_embedding_space) on the first `rows`
    usable rows of `dataset` (fit_sample), on the driver's CPU, at the precision the embed job's
    default gives there (encode.resolve_precision); returns the rows used (0: centring off, or a two-stream
    model)."""
    if rows == 0 or not hasattr(model, "fit_embedding_space"):
        return 0
    torch.set_num_threads(os.cpu_count() or 1)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for batch in dataset.limit(rows).iter_torch_batches(batch_size=batch_size, device="cpu"):
            keep = batch.pop("keep")
            if keep.any():
                yield {k: v[keep] for k, v in batch.items()}

    cpu = torch.device("cpu")
    with autocast(resolve_precision("auto", cpu), cpu):
        return model.eval().fit_embedding_space(batches(), whiten_shrink)


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
        train_loop_config={"train": cfg.to_dict(), "model": model_config.to_dict(), "init_state": init_state,
                           "progress_path": progress_path(storage_path)},
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


def progress_path(work: str) -> str:
    """The run's progress lines (one per report, rank 0), in its work dir: `tail -f` it from anywhere."""
    return os.path.join(os.path.abspath(work), "progress.log")


@contextlib.contextmanager
def echo_new_lines(path: str, echo: Callable[[str], None], every_s: float = 1.0) -> Iterator[None]:
    """While the block runs, pass each line appended to `path` to `echo` (from a thread: the block may be
    a Ray Train run, which must keep the main thread)."""
    done = threading.Event()
    offset = os.path.getsize(path) if os.path.exists(path) else 0

    def follow() -> None:
        nonlocal offset
        while True:
            stop = done.wait(every_s)
            if os.path.exists(path):
                with open(path) as f:
                    f.seek(offset)
                    for line in f:
                        echo(line.rstrip("\n"))
                    offset = f.tell()
            if stop:
                return

    thread = threading.Thread(target=follow, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


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
                log.info("%s is already trained to step %d (model_version %s): nothing to do", out_dir, cfg.steps,
                         manifest["model_version"])
                return manifest["model_version"]
        overwrite = True  # the published dir (if any) is from this run, trained to fewer steps
    else:
        if os.path.exists(work) and not overwrite:
            raise FileExistsError(f"{work} holds a previous run: pass --resume to continue it, "
                                  "or --overwrite to start again")
        storage.check_can_publish(out_dir, overwrite)
        shutil.rmtree(work, ignore_errors=True)

    columns = ColumnMap(**cfg.columns)
    validate_schema(catalog_uri, columns)  # fails naming the column and the fix, before any work
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
            tokenizer = train_tokenizer(iter_titles(catalog_uri, columns.title), vocab_size=cfg.vocab_size)
            log.info("trained a %d-token WordPiece vocab on the catalog titles in %.1f s", len(tokenizer),
                     time.perf_counter() - t0)
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
    log.info("pretraining %s (%s) for %d steps on %d worker(s); progress also in %s", cfg.variant, cfg.preset,
             cfg.steps, cfg.num_workers, progress_path(work))
    with echo_new_lines(progress_path(work), log.info):
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
    if cfg.center_rows:
        log.info("trained in %.0f s; fitting the published vector's centre%s on up to %d catalog rows", train_s,
                 "" if cfg.whiten_shrink is None else " and whitening", cfg.center_rows)
    t0 = time.perf_counter()
    center_rows = fit_embedding_space(model, fit_sample(catalog_uri, processor, cfg), cfg.center_rows,
                                      cfg.whiten_shrink)
    if center_rows:
        log.info("fitted on %d rows in %.1f s; publishing %s", center_rows, time.perf_counter() - t0, out_dir)
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
            "embedding_whitening_shrink": cfg.whiten_shrink if center_rows else None,
            "catalog": catalog_uri,
            "train_config": cfg.to_dict(),
        }
        storage.publish(stage, out_dir, manifest, overwrite=overwrite)
    return version
