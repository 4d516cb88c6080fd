"""The `item-pipeline` command line: thin click commands over the pipeline library and the jobs (the top
floor of the layers: item_model <- pipeline <- jobs <- this)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import sys

import click
import numpy as np

from item_model.presets import PRESETS, VARIANTS
from jobs import runtime
from pipeline.index import IndexFilesError, RecallTooLowError

IEC = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """'8GiB', '512M', '1.5g', '1000000' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise click.BadParameter(f"{text!r} is not a size; use e.g. 8GiB, 512MiB")
    return int(float(m.group(1)) * IEC[m.group(2)])


def _init_ray() -> None:
    """Start Ray (local, or the cluster named by RAY_ADDRESS) as jobs.runtime decides; the command's last
    line names where the engine's logs went."""
    ctx = click.get_current_context().find_root()
    log_dir = runtime.init_ray(verbose=ctx.obj["verbose"])
    if log_dir:
        ctx.call_on_close(lambda: click.echo(f"engine logs (Ray, Ray Data, Ray Train): {log_dir}", err=True))


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(str(e))


# errors the library raises for bad input or a bad state on disk; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IndexFilesError, RecallTooLowError)


@click.group()
@click.version_option(package_name="item-pipeline")
@click.option("--verbose", is_flag=True, help="Print the engine's logs too (Ray, Ray Data, Ray Train); "
              "by default they go to Ray's session dir, named at the end.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Offline product-embedding pipeline: ITEm embeddings, FAISS dedup, category backfill."""
    runtime.configure_output(verbose)
    ctx.obj = {"verbose": verbose}


@main.command(name="make-sample-catalog")
@click.argument("out", type=click.Path(dir_okay=True, file_okay=True, writable=True))
@click.option("--items", "n_items", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Number of catalog rows (listings) to generate.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed; the same seed and --items give a byte-identical catalog.")
@click.option("--rows-per-file", type=click.IntRange(min=1), default=None,
              help="Write OUT as a directory of part files with at most this many rows each "
                   "(default: one Parquet file at OUT; OUT ending in / is a directory of 500-row parts).")
def make_sample_catalog(out: str, n_items: int, seed: int, rows_per_file: int | None) -> None:
    """Generate a sample marketplace catalog as Parquet at OUT (which must not exist).

    Drawn product photos and titles in 12 categories, re-listings by several sellers, hard
    duplicate cases, ~10% rows without a category, and a few deliberately broken rows
    (column `defect`).

    Example:

        item-pipeline make-sample-catalog sample.parquet --items 2000 --seed 0
    """
    from pipeline.sample_catalog import summarize_catalog, write_sample_catalog  # PIL, numpy: only here

    try:
        table = write_sample_catalog(out, n_items, seed, rows_per_file=rows_per_file)
    except (FileExistsError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {out}")
    click.echo(summarize_catalog(table))


@main.command(name="pretrain")
@click.argument("catalog")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="Model size preset (item_model.config.PRESETS) [default: the start's (minilm for "
                   "--init-from minilm), else small].")
@click.option("--variant", type=click.Choice(list(VARIANTS)), default="item", show_default=True,
              help="Model variant (item_model.config.VARIANTS): the full ITEm model or one of the "
                   "baselines of EVALUATION.md, trained by the same loop.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ray Train workers (DDP ranks); each takes one GPU with --gpu.")
@click.option("--gpu", is_flag=True, help="One GPU per worker, bf16 autocast (default: CPU, fp32).")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Optimizer steps in total (a resumed run continues up to this number).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Rows per step per worker.")
@click.option("--lr", type=float, default=5e-4, show_default=True, help="Peak AdamW learning rate.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Linear warm-up steps before cosine decay [default: 10% of --steps].")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Checkpoint (model, optimizer, scheduler, step) every N steps.")
@click.option("--init-from", default=None,
              help="Pretrained start: a named one (minilm: all-MiniLM-L6-v2, shipped by the minilm extra, "
                   "hash-checked) or a local Hugging Face BERT dir with model.safetensors. Its vocab and "
                   "weights initialise the text stream and the encoder.")
@click.option("--fresh-lr-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="With --init-from: the image stream and heads (not in the start) learn at lr x this.")
@click.option("--start-frozen-steps", type=click.IntRange(min=0), default=None,
              help="With --init-from: the start's parameters stay fixed for the first N steps while the image "
                   "stream and heads learn against it; then they warm up [default: 20% of --steps with "
                   "--init-from, else 0].")
@click.option("--whiten-shrink", default=None, metavar="EPS|none",
              help="At export, after centring: scale each principal direction of the training catalog's vectors "
                   "by 1/sqrt(variance + EPS x the mean variance) (EPS > 0), or 'none' for centring only "
                   "[default: 1].")
@click.option("--resume", is_flag=True, help="Continue the run kept beside OUT_DIR from its latest checkpoint.")
@click.option("--overwrite", is_flag=True, help="Discard a previous run and model dir at OUT_DIR and start again.")
@click.option("--max-failures", type=click.IntRange(min=-1), default=2, show_default=True,
              help="Worker-group restarts from the last checkpoint before the run fails (-1: no limit).")
@click.option("--column-map", default=None,
              help="Catalog column names, e.g. id=sku,title=name,image=photo (keys: id, title, image, image_uri).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for init, masking and image swaps.")
def pretrain(catalog: str, out_dir: str, preset: str | None, variant: str, workers: int, gpu: bool, steps: int,
             batch_size: int, lr: float, warmup_steps: int | None, checkpoint_every: int, init_from: str | None,
             fresh_lr_scale: float, start_frozen_steps: int | None, whiten_shrink: str | None, resume: bool,
             overwrite: bool, max_failures: int, column_map: str | None, seed: int) -> None:
    """Pretrain an ITEm model on CATALOG (Parquet file/dir, local or s3://) into the model dir OUT_DIR.

    Runs on the local machine or on the Ray cluster this process is attached to (RAY_ADDRESS), with no
    change: Ray Data preprocesses on CPU workers, Ray Train trains on --workers ranks. Checkpoints and
    the title tokenizer are kept in OUT_DIR.train/ so that --resume can continue; a progress line is
    printed per report (step, losses, samples/s, ETA).

    Example:

        item-pipeline pretrain sample.parquet models/item-small --preset small --workers 2 --steps 2000

        item-pipeline pretrain catalog/ models/item-minilm --init-from minilm --variant item_contrastive
    """
    import ray
    import ray.train

    from item_model.starts import NAMED_STARTS
    from item_model.training import TrainConfig
    from pipeline.pretrain import pretrain as run_pretrain

    named = NAMED_STARTS.get(init_from or "")
    preset = preset or (named.preset if named else "small")
    cfg = TrainConfig(
        preset=preset, variant=variant, steps=steps, batch_size=batch_size, lr=lr, fresh_lr_scale=fresh_lr_scale,
        start_frozen_steps=start_frozen_steps,
        warmup_steps=warmup_steps if warmup_steps is not None else steps // 10,
        checkpoint_every=checkpoint_every, num_workers=workers, use_gpu=gpu, max_failures=max_failures,
        init_from=init_from, seed=seed, columns=_column_overrides(column_map),
        **({} if whiten_shrink is None else {"whiten_shrink": _shrink(whiten_shrink)}),
    )
    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    _init_ray()
    try:
        version = run_pretrain(catalog, out_dir, cfg, resume=resume, overwrite=overwrite)
    except (FileExistsError, FileNotFoundError, ValueError, ray.train.TrainingFailedError) as err:
        raise click.ClickException(f"{type(err).__name__}: {err}") from err
    click.echo(f"model dir {out_dir} (model_version {version})")


@main.command(name="embed")
@click.argument("catalog")
@click.argument("model_dir")
@click.argument("out")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Rows per preprocess task batch and per encode call.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Encode actors in the pool (one model copy each; one GPU each with --gpu).")
@click.option("--gpu/--no-gpu", default=False, show_default=True,
              help="Give each encode actor one GPU; otherwise encode on CPU.")
@click.option("--encode-threads", type=click.IntRange(min=1), default=None,
              help="Torch threads per CPU encode actor (default: torch's choice).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 where the device multiplies it natively (GPUs; CPUs with AVX512-BF16 or AMX), "
                   "about 2x fp32 there; fp32 elsewhere. The manifest records what each row got.")
@click.option("--previous", default=None,
              help="A published embedding table: rows whose content and model version are unchanged are "
                   "copied from it instead of re-encoded.")
@click.option("--column-map", default=None,
              help="Catalog column names, e.g. id=sku,title=name,image=photo (keys: id, title, image, image_uri).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is already published.")
def embed(catalog: str, model_dir: str, out: str, batch_size: int, concurrency: int, gpu: bool,
          encode_threads: int | None, precision: str, previous: str | None, column_map: str | None,
          overwrite: bool) -> None:
    """Embed every row of CATALOG (Parquet file, directory or s3:// prefix) with MODEL_DIR and publish
    the embedding table, its `_rejects/` and `_manifest.json` at OUT (local or s3://). MODEL_DIR may be on
    s3:// too: each machine fetches it once to a local cache (ITEM_PIPELINE_MODEL_CACHE).

    Example:

        item-pipeline embed sample.parquet model/ embeddings/ --batch-size 256 --previous embeddings-yesterday/
    """
    from item_model import read_model_version
    from pipeline import storage
    from pipeline.catalog import CatalogSchemaError, ColumnMap, validate_schema
    from pipeline.embed import EmbedOptions, run_embed, summary_line

    try:
        options = EmbedOptions(
            batch_size=batch_size, concurrency=concurrency, num_gpus=1 if gpu else 0,
            encode_threads=encode_threads, precision=precision, previous=previous,
            columns=ColumnMap.parse(column_map), overwrite=overwrite,
        )
        # the cheap checks first, so that a bad catalog, model dir or a published OUT fails before Ray starts
        validate_schema(catalog, options.columns)
        read_model_version(storage.local_dir(model_dir))  # an s3:// model dir is fetched here, once per machine
        storage.check_can_publish(out, overwrite)
        _init_ray()
        manifest = run_embed(catalog, model_dir, out, options)
    except (CatalogSchemaError, FileExistsError, FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(summary_line(manifest))


@main.command("build-index")
@click.argument("embeddings")
@click.argument("out")
@click.option("--shards", type=click.IntRange(min=1), default=4, show_default=True, help="Number of shards, built in parallel Ray tasks.")
@click.option("--index", "spec", default="auto", show_default=True, help="FAISS index_factory spec (e.g. 'IVF4096,SQ8'), or 'auto' to choose from the size and --memory-budget.")
@click.option("--memory-budget", default="8GiB", show_default=True, help="RAM the whole index may take (e.g. 512MiB, 8GiB); drives --index auto.")
@click.option("--min-recall", type=click.FloatRange(0, 1), default=0.95, show_default=True, help="Recall@10 vs exact search the build must reach on held-back queries, or it fails and publishes nothing.")
@click.option("--eval-queries", type=click.IntRange(min=1), default=1000, show_default=True, help="Held-back queries for the recall written to the manifest.")
@click.option("--tune-queries", type=click.IntRange(min=1), default=500, show_default=True, help="Other held-back queries used to tune nprobe / efSearch.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the training sample, query sample and k-means.")
@click.option("--update-from", "previous", metavar="INDEX",
              help="Update this published index with the changes of EMBEDDINGS since the table it was made from, "
                   "instead of building from scratch (rebuilt anyway when it cannot be, saying why).")
@click.option("--max-changed-share", type=click.FloatRange(0, 1), default=0.10, show_default=True,
              help="With --update-from: rebuild once the items changed since the last full build pass this share.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is already published.")
def build_index_cmd(embeddings, out, shards, spec, memory_budget, min_recall, eval_queries, tune_queries, seed,
                    previous, max_changed_share, overwrite):
    """Build the sharded FAISS index of the embedding table EMBEDDINGS into OUT.

    Example: item-pipeline build-index runs/emb runs/index --shards 4 --memory-budget 2GiB

    item-pipeline build-index runs/dt=2026-11-21/embeddings runs/dt=2026-11-21/index --update-from runs/dt=2026-11-20/index
    """
    from pipeline.index_build import IndexBuildConfig
    from pipeline.index_update import build_or_update

    config = IndexBuildConfig(
        n_shards=shards, spec=spec, memory_budget_bytes=parse_bytes(memory_budget), min_recall=min_recall,
        n_eval_queries=eval_queries, n_tune_queries=tune_queries, seed=seed,
    )
    _init_ray()
    try:
        manifest = build_or_update(embeddings, out, config, previous, max_changed_share if previous else 0.0, overwrite)
    except USER_ERRORS as e:
        raise _fail(e) from e
    click.echo(
        f"published {out}: {manifest['spec']} x {len(manifest['shards'])} shards, {manifest['n_vectors']} vectors, "
        f"search {manifest['search_params']}, recall@10 {manifest['recall_at_10']}, {manifest['build_seconds']} s"
        + (f"; {'updated' if manifest['mode'] == 'update' else 'built from scratch'}: {manifest['reason']}" if previous else "")
    )


@main.command()
@click.argument("index")
@click.option("--item-id", help="Search with the vector of this item (read from the embedding table the index was built from).")
@click.option("--vector-file", type=click.Path(exists=True, dir_okay=False), help="Search with vectors from a .npy file, [D] or [Q, D], L2-normalised.")
@click.option("--title", default=None, help="A new listing's title: embedded with the model dir named in the index manifest.")
@click.option("--image", "image_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A new listing's image file (JPEG/PNG/WebP), with or without --title.")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours to return per query.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
def search(index, item_id, vector_file, title, image_path, k, as_json):
    """Query all shards of INDEX and print the merged top-k (query, rank, item_id, score).

    Example: item-pipeline search runs/index --item-id 15970 --k 5

    A listing that is not in the catalog: item-pipeline search runs/index --title "red tee" --image tee.jpg
    """
    from pipeline import storage
    from pipeline.index import ShardedIndex, read_embedding_table

    new_listing = title is not None or image_path is not None
    if sum([item_id is not None, vector_file is not None, new_listing]) != 1:
        raise click.UsageError("give exactly one of --item-id, --vector-file, or --title/--image")
    try:
        sharded = ShardedIndex.load(index)
        if item_id is not None:
            embeddings = storage.read_manifest(index)["embeddings"]
            ids, vectors, _ = read_embedding_table(embeddings, item_ids=[item_id])
            if not len(ids):
                raise ValueError(f"item {item_id!r} is not in the embedding table {embeddings}")
        elif new_listing:
            from pipeline.encode import embed_listing, table_precision

            image = open(image_path, "rb").read() if image_path else None
            manifest = storage.read_manifest(index)
            vectors = embed_listing(manifest["model_dir"], title, image, table_precision(manifest["embeddings"]))
        else:
            vectors = np.atleast_2d(np.load(vector_file)).astype(np.float32)
        scores, found = sharded.search(vectors, k)
    except USER_ERRORS as e:
        raise _fail(e) from e
    for q in range(len(vectors)):
        for rank, (s, i) in enumerate(zip(scores[q], found[q]), start=1):
            if i is None:
                continue
            if as_json:
                click.echo(json.dumps({"query": q, "rank": rank, "item_id": i, "score": round(float(s), 6)}))
            else:
                click.echo(f"{q}\t{rank}\t{i}\t{s:.4f}")


@main.command()
@click.argument("index")
@click.argument("embeddings")
@click.argument("out")
@click.option("--threshold", type=float, help="Minimum cosine similarity of a duplicate pair (required unless --calibrate-precision).")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours searched per item.")
@click.option("--catalog", help="Catalog with group_id labels, for --calibrate-precision.")
@click.option("--column-map", default=None, help="Catalog column names, e.g. id=sku,group=product (keys as for embed).")
@click.option("--calibrate-precision", type=click.FloatRange(0, 1), help="Choose the threshold that reaches this precision on the catalog's labelled groups.")
@click.option("--actors", type=click.IntRange(min=1), default=1, show_default=True, help="Search actors per index shard; each loads its one shard.")
@click.option("--threads-per-actor", type=click.IntRange(min=1), help="FAISS threads per actor (default: FAISS's own, all cores).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is already published.")
@click.option("--max-cluster-share", type=click.FloatRange(0, 1, min_open=True), default=0.05, show_default=True,
              help="Fail, publishing nothing, when one duplicate cluster holds more than this share of the listings.")
def dedup(index, embeddings, out, threshold, k, catalog, column_map, calibrate_precision, actors, threads_per_actor,
          overwrite, max_cluster_share):
    """Find duplicate pairs and clusters among all items of EMBEDDINGS; write them to OUT.

    Example: item-pipeline dedup runs/index runs/emb runs/dups --threshold 0.97
    """
    from pipeline.catalog import ColumnMap
    from pipeline.dedup import DedupSanityError, read_groups, run_dedup

    if threshold is None and calibrate_precision is None:
        raise click.UsageError("give --threshold, or --calibrate-precision with --catalog")
    if (calibrate_precision is None) != (catalog is None):
        raise click.UsageError("--calibrate-precision and --catalog go together")
    _init_ray()
    try:
        groups = read_groups(catalog, ColumnMap.parse(column_map)) if catalog else None
        if catalog and groups is None:
            raise ValueError(f"catalog {catalog} has no group_id column to calibrate the threshold on; "
                             "give --threshold instead")
        calibrate = (groups, calibrate_precision) if catalog else None
        manifest = run_dedup(index, embeddings, out, threshold, k, calibrate, actors, threads_per_actor, overwrite,
                             max_cluster_share)
    except (*USER_ERRORS, DedupSanityError) as e:
        raise _fail(e) from e
    if (cal := manifest.get("calibration")) and not cal["reached"]:
        click.echo(f"no threshold reaches precision {cal['target_precision']} on the labelled groups (best "
                   f"{cal['best_precision']:.3f}, at cosine >= {cal['best_threshold']:.4f}): no pairs published")
    elif cal:
        click.echo(f"calibrated threshold {manifest['threshold']:.4f}: precision {cal['precision']:.3f} "
                   f"on labelled groups, {cal['pairs']} pairs")
    click.echo(f"published {out}: {manifest['n_pairs']} pairs, {manifest['n_clusters']} clusters")


@main.command("backfill-categories")
@click.argument("index")
@click.argument("embeddings")
@click.argument("catalog")
@click.argument("out")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours that vote.")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Leave a row unfilled when the winning category's share of the vote is under this.")
@click.option("--category-col", default=None, help="Catalog column holding the category (null = unknown) [default: category].")
@click.option("--column-map", default=None,
              help="Catalog column names, e.g. id=sku,category=cat,group=product (keys as for embed).")
@click.option("--eval-sample", type=click.IntRange(min=0), default=20_000, show_default=True, help="Labelled items in the leave-one-out evaluation (0: skip).")
@click.option("--plot", is_flag=True, help="Also write OUT/precision_coverage.png.")
@click.option("--actors", type=click.IntRange(min=1), default=1, show_default=True, help="Actors per stage (each index shard's stage loads its one shard).")
@click.option("--threads-per-actor", type=click.IntRange(min=1), help="FAISS threads per actor (default: FAISS's own, all cores).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is already published.")
def backfill_categories_cmd(index, embeddings, catalog, out, k, min_confidence, category_col, column_map, eval_sample,
                            plot, actors, threads_per_actor, overwrite):
    """Predict the category of CATALOG rows whose category is null from their labelled neighbours.

    Example: item-pipeline backfill-categories runs/index runs/emb catalog.parquet runs/backfill --min-confidence 0.7 --plot
    """
    from pipeline.backfill import run_backfill
    from pipeline.catalog import ColumnMap

    try:
        columns = ColumnMap.parse(column_map)
        if category_col:
            columns = dataclasses.replace(columns, category=category_col)
        _init_ray()
        report = run_backfill(index, embeddings, catalog, out, columns, k, min_confidence, eval_sample,
                              overwrite=overwrite, plot=plot, num_actors=actors, threads_per_actor=threads_per_actor)
    except USER_ERRORS as e:
        raise _fail(e) from e
    click.echo(f"published {out}: {report['n_filled']} filled, {report['n_unfilled']} left unfilled (confidence < {min_confidence}), "
               f"{report['n_no_embedding']} without an embedding")
    if "fill_accuracy" in report:
        click.echo(f"fill accuracy vs true_category: {report['fill_accuracy']}")
    loo = report.get("leave_one_out")
    if loo:
        click.echo(f"leave-one-out on {loo['n']} labelled items: accuracy {loo['accuracy']:.4f}")
        click.echo("threshold\tcoverage\tprecision")
        for point in loo["curve"]:
            click.echo(f"{point['threshold']:.2f}\t{point['coverage']:.4f}\t{point['precision']:.4f}")


@main.command(name="nightly")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The nightly YAML config (see jobs/nightly.yaml); validated before any work.")
@click.option("--date", "run_date", type=click.DateTime(["%Y-%m-%d"]), default=None,
              help="Run date YYYY-MM-DD (default: today, UTC). Outputs go to OUTPUT_ROOT/dt=DATE/.")
@click.option("--output-root", default=None, help="Override the config's output_root (local dir or s3:// prefix).")
@click.option("--catalog", default=None, help="Override the config's catalog (local path or s3:// URI).")
@click.option("--model-dir", default=None, help="Override the config's model_dir.")
def nightly(config_path: str, run_date, output_root: str | None, catalog: str | None, model_dir: str | None) -> None:
    """Run the nightly job for one date: embed (incremental), build-index, dedup, backfill, report.

    Re-running a finished date does nothing; re-running after a failure resumes at the first stage
    that was not published. Exits non-zero, naming the stage, when a stage fails.

    Example:

        item-pipeline nightly --config jobs/nightly.yaml --date 2026-11-21
    """
    import datetime as dt

    import pipeline.encode  # noqa: F401 - torch and its CPU kernels before any S3 client (see encode.Encoder)
    from jobs.config import ConfigError, load_config
    from jobs.nightly import StageFailed, run_nightly

    try:
        config = load_config(config_path, output_root=output_root, catalog=catalog, model_dir=model_dir)
    except ConfigError as e:
        raise click.ClickException(f"{config_path}: {e}") from e
    day = run_date.date() if run_date else dt.datetime.now(dt.timezone.utc).date()
    _init_ray()
    try:
        report = run_nightly(config, day)
    except StageFailed as e:
        raise click.ClickException(str(e)) from e
    if report.get("already_complete"):
        click.echo(f"run {day} is already complete in {report['run_dir']}: nothing to do")
        return
    from jobs.nightly import report_markdown

    click.echo(report_markdown(report))
    click.echo(f"report: {report['run_dir']}/report.md")


@main.command(name="review")
@click.argument("run_dir")
@click.option("--out", default=None, help="Where to write the page [default: RUN_DIR/review.html].")
@click.option("--per-section", type=click.IntRange(min=1), default=6, show_default=True,
              help="Clusters, pairs and backfill examples shown per section.")
def review(run_dir: str, out: str | None, per_section: int) -> None:
    """Write the review page of a nightly run: the largest duplicate clusters with photos and titles side by
    side, pairs just above and below the threshold, backfill examples per confidence band, the counts.

    Example: item-pipeline review runs/dt=2026-11-21
    """
    from pipeline.review import write_review

    try:
        path = write_review(run_dir.rstrip("/"), per_section=per_section, out_uri=out)
    except USER_ERRORS as err:
        raise _fail(err) from err
    click.echo(f"review page: {path}")


@main.command(name="evaluate")
@click.argument("catalog")
@click.argument("out_dir", type=click.Path(file_okay=False, writable=True))
@click.option("--models", "models", multiple=True, metavar="NAME=MODEL_DIR",
              help="A model dir to evaluate under a name; repeat for each model.")
@click.option("--baselines", default="tfidf,phash", show_default=True,
              help="Comma-separated non-learned references to include (tfidf, phash); '' for none.")
@click.option("--relistings", type=click.IntRange(min=0), default=500, show_default=True,
              help="Re-listing queries per perturbation family (image, title, both).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the re-listings, the --limit sample, the k-NN query sample and the probe split.")
@click.option("--group-col", default="group_id", show_default=True,
              help="Column of ground-truth product groups (null = a listing alone); fashion data: dup_group.")
@click.option("--label-col", default="true_category", show_default=True,
              help="Column of the category to predict (null = unlabelled); fashion data: articleType.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Evaluate a seeded sample of about this many rows, keeping product groups whole.")
@click.option("--knn-queries", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Labelled rows sampled as k-NN vote queries (the gallery is every labelled row).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Rows per model encode call.")
def evaluate_command(catalog: str, out_dir: str, models: tuple[str, ...], baselines: str, relistings: int,
                     seed: int, group_col: str, label_col: str, limit: int | None, knn_queries: int,
                     batch_size: int) -> None:
    """Compare models and baselines on CATALOG; write report.md, results.json and plots to OUT_DIR.

    OUT_DIR must not exist; it appears only once the report is complete.

    Example: the fashion dev set, two models against the TF-IDF and pHash references


    \b
        item-pipeline evaluate ../shared/data/fashion-dev.parquet eval-report \\
            --models item=runs/item --models vilt=runs/vilt \\
            --group-col dup_group --label-col articleType
    """
    from pipeline.eval_report import main_table, write_report  # matplotlib only for this command
    from pipeline.eval_embedders import baseline_embedders, model_embedder
    from pipeline.evaluate import EvalOptions, evaluate, read_catalog

    if os.path.exists(out_dir):
        raise click.ClickException(f"{out_dir} already exists; choose a new OUT_DIR (nothing is overwritten)")
    options = EvalOptions(group_col=group_col, label_col=label_col, relistings=relistings, seed=seed,
                          knn_max_queries=knn_queries)
    try:
        named = dict(_name_value(m) for m in models)
        table = read_catalog(catalog, options, limit)
        embedders = {name: model_embedder(path, batch_size) for name, path in named.items()}
        embedders.update(baseline_embedders([b for b in baselines.split(",") if b],
                                            table.column(options.title_col).to_pylist()))
        if not embedders:
            raise ValueError("nothing to evaluate: give --models NAME=MODEL_DIR and/or --baselines")
        results = evaluate(table, embedders, options)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    results.info.update(catalog=catalog, command=shlex.join(["item-pipeline", *sys.argv[1:]]))
    staging = f"{out_dir.rstrip('/')}.tmp-{os.getpid()}"
    write_report(results, staging)
    os.rename(staging, out_dir)
    click.echo(main_table(results))
    click.echo(f"report: {os.path.join(out_dir, 'report.md')} (wall time {results.info['wall_s']} s)")


def _column_overrides(spec: str | None) -> dict[str, str]:
    """--column-map -> the ColumnMap fields that differ from the catalog contract's names."""
    from pipeline.catalog import ColumnMap

    try:
        columns = ColumnMap.parse(spec)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--column-map") from err
    return {k: v for k, v in columns.to_dict().items() if v != getattr(ColumnMap(), k)}


def _shrink(text: str) -> float | None:
    """--whiten-shrink EPS|none -> TrainConfig.whiten_shrink."""
    from item_model.training import parse_whiten_shrink

    try:
        return parse_whiten_shrink(text)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--whiten-shrink") from None


def _name_value(text: str) -> tuple[str, str]:
    """'NAME=MODEL_DIR' -> (NAME, MODEL_DIR), with a usage hint when malformed."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise ValueError(f"--models expects NAME=MODEL_DIR, got {text!r}")
    return name, value


if __name__ == "__main__":
    main()
