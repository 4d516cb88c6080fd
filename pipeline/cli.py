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
