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


if __name__ == "__main__":
    main()
