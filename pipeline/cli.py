"""The `item-pipeline` command line: thin click commands over the pipeline library."""

from __future__ import annotations

import click

from pipeline.sample_catalog import summarize_catalog, write_sample_catalog


@click.group()
@click.version_option(package_name="item-pipeline")
def main() -> None:
    """Offline product-embedding pipeline: ITEm embeddings, FAISS dedup, category backfill."""


@main.command(name="make-sample-catalog")
@click.argument("out", type=click.Path(dir_okay=True, file_okay=True, writable=True))
@click.option("--items", "n_items", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Number of catalog rows (listings) to generate.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed; the same seed and --items give a byte-identical catalog.")
@click.option("--rows-per-file", type=click.IntRange(min=1), default=None,
              help="Write OUT as a directory of part files with at most this many rows each "
                   "(default: one Parquet file at OUT).")
def make_sample_catalog(out: str, n_items: int, seed: int, rows_per_file: int | None) -> None:
    """Generate a sample marketplace catalog as Parquet at OUT (which must not exist).

    Drawn product photos and titles in 12 categories, re-listings by several sellers, hard
    duplicate cases, ~10% rows without a category, and a few deliberately broken rows
    (column `defect`).

    Example:

        item-pipeline make-sample-catalog sample.parquet --items 2000 --seed 0
    """
    try:
        table = write_sample_catalog(out, n_items, seed, rows_per_file=rows_per_file)
    except (FileExistsError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {out}")
    click.echo(summarize_catalog(table))


@main.command(name="pretrain")
@click.argument("catalog")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(["tiny", "small", "base"]), default="small", show_default=True,
              help="Model size preset (item_model.config.PRESETS).")
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
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Local Hugging Face BERT dir: its vocab and weights initialise the text stream and encoder.")
@click.option("--resume", is_flag=True, help="Continue the run kept beside OUT_DIR from its latest checkpoint.")
@click.option("--overwrite", is_flag=True, help="Discard a previous run and model dir at OUT_DIR and start again.")
@click.option("--max-failures", type=click.IntRange(min=-1), default=2, show_default=True,
              help="Worker-group restarts from the last checkpoint before the run fails (-1: no limit).")
@click.option("--id-column", default="item_id", show_default=True, help="Catalog column with the item id.")
@click.option("--title-column", default="title", show_default=True, help="Catalog column with the title.")
@click.option("--image-column", default="image", show_default=True, help="Catalog column with encoded image bytes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for init, masking and image swaps.")
def pretrain(catalog: str, out_dir: str, preset: str, workers: int, gpu: bool, steps: int, batch_size: int,
             lr: float, warmup_steps: int | None, checkpoint_every: int, init_from: str | None, resume: bool,
             overwrite: bool, max_failures: int, id_column: str, title_column: str, image_column: str,
             seed: int) -> None:
    """Pretrain an ITEm model on CATALOG (Parquet file/dir, local or s3://) into the model dir OUT_DIR.

    Runs on the local machine or on the Ray cluster this process is attached to (RAY_ADDRESS), with no
    change: Ray Data preprocesses on CPU workers, Ray Train trains on --workers ranks. Checkpoints and
    the title tokenizer are kept in OUT_DIR.train/ so that --resume can continue; a progress line is
    printed per report (step, losses, samples/s, ETA).

    Example:

        item-pipeline pretrain sample.parquet models/item-small --preset small --workers 2 --steps 2000
    """
    import ray
    import ray.train

    from item_model.train import TrainConfig
    from item_model.train import pretrain as run_pretrain

    cfg = TrainConfig(
        preset=preset, steps=steps, batch_size=batch_size, lr=lr,
        warmup_steps=warmup_steps if warmup_steps is not None else steps // 10,
        checkpoint_every=checkpoint_every, num_workers=workers, use_gpu=gpu, max_failures=max_failures,
        init_from=init_from, seed=seed, id_column=id_column, title_column=title_column, image_column=image_column,
    )
    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    if not ray.is_initialized():
        ray.init()
    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress line per report
    try:
        version = run_pretrain(catalog, out_dir, cfg, resume=resume, overwrite=overwrite)
    except (FileExistsError, FileNotFoundError, ValueError, ray.train.TrainingFailedError) as err:
        raise click.ClickException(f"{type(err).__name__}: {err}") from err
    click.echo(f"model dir {out_dir} (model_version {version})")


@main.command(name="embed")
@click.argument("catalog")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Rows per preprocess task batch and per encode call.")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Encode actors in the pool (one model copy each; one GPU each with --gpu).")
@click.option("--gpu/--no-gpu", default=False, show_default=True,
              help="Give each encode actor one GPU (bf16); otherwise encode on CPU in fp32.")
@click.option("--encode-threads", type=click.IntRange(min=1), default=None,
              help="Torch threads per CPU encode actor (default: torch's choice).")
@click.option("--previous", default=None,
              help="A published embedding table: rows whose content and model version are unchanged are "
                   "copied from it instead of re-encoded.")
@click.option("--column-map", default=None,
              help="Catalog column names, e.g. id=sku,title=name,image=photo (keys: id, title, image, image_uri).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is already published.")
def embed(catalog: str, model_dir: str, out: str, batch_size: int, concurrency: int, gpu: bool,
          encode_threads: int | None, previous: str | None, column_map: str | None, overwrite: bool) -> None:
    """Embed every row of CATALOG (Parquet file, directory or s3:// prefix) with MODEL_DIR and publish
    the embedding table, its `_rejects/` and `_manifest.json` at OUT (local or s3://).

    Example:

        item-pipeline embed sample.parquet model/ embeddings/ --batch-size 256 --previous embeddings-yesterday/
    """
    import ray

    from pipeline import storage
    from pipeline.catalog import CatalogSchemaError, ColumnMap, validate_schema
    from pipeline.embed import EmbedOptions, run_embed, summary_line

    try:
        options = EmbedOptions(
            batch_size=batch_size, concurrency=concurrency, num_gpus=1 if gpu else 0,
            encode_threads=encode_threads, previous=previous, columns=ColumnMap.parse(column_map),
            overwrite=overwrite,
        )
        # the cheap checks first, so that a bad catalog or a published OUT fails before Ray starts
        validate_schema(catalog, options.columns)
        storage.check_can_publish(out, overwrite)
        if not ray.is_initialized():
            ray.init()
        manifest = run_embed(catalog, model_dir, out, options)
    except (CatalogSchemaError, FileExistsError, FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(summary_line(manifest))


if __name__ == "__main__":
    main()
