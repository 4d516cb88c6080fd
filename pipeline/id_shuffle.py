"""Passes over every id of a table, split by a hash of the id: a two-round hash shuffle in Ray tasks.

    files, in runs of about ID_BUCKET_ROWS rows -> map task: read the run's key columns once, split its
                                                  rows into n parts by `catalog.id_bucket` of the id
    part b of every map task                    -> reduce task b (the caller's): every row of one id

Every row is read once and moved once, so a pass costs the same per row whatever the table's size, and
no process holds more than one run's or one part's rows. The embed job's duplicate-id pass and the index
update's key diff are such passes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import ray

from pipeline.catalog import arrow_filesystem, id_as_string, id_bucket, open_dataset

ID_BUCKET_ROWS = 2_000_000  # rows per map task's run of files, and about as many per part


def n_parts(rows: int) -> int:
    """Parts of a pass over `rows` rows: one per ID_BUCKET_ROWS."""
    return max(1, -(-rows // ID_BUCKET_ROWS))


def id_parts(uri: str, columns: list[str], id_column: str, parts: int | None = None
             ) -> tuple[list[list[ray.ObjectRef]], int]:
    """Start the map round over the Parquet files at `uri`: ([part][map task] refs of Arrow tables holding
    `columns` of the rows whose id falls in that part, the id cast to string, null ids dropped; the table's
    rows, from the footers). `parts` defaults to one per ID_BUCKET_ROWS rows; two tables whose ids are to
    meet need the same. Pass part b's refs to one reduce task."""
    runs, rows, total = [[]], 0, 0
    for fragment in open_dataset(uri).get_fragments():
        n = fragment.count_rows()
        if rows and rows + n > ID_BUCKET_ROWS:
            runs.append([])
            rows = 0
        runs[-1].append(fragment.path)
        rows, total = rows + n, total + n
    parts = parts or n_parts(total)
    split = ray.remote(_split).options(num_cpus=1, num_returns=parts)
    refs = [split.remote(uri, files, columns, id_column, parts) for files in runs if files]
    refs = [r if parts > 1 else [r] for r in refs]
    return [[r[b] for r in refs] for b in range(parts)], total


def _split(uri: str, files: list[str], columns: list[str], id_column: str, parts: int) -> list[pa.Table] | pa.Table:
    fs, _ = arrow_filesystem(uri)
    table = pds.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns)
    i = table.schema.get_field_index(id_column)
    table = table.set_column(i, id_column, id_as_string(table.column(i)))
    table = table.filter(pc.is_valid(table.column(i)))
    if parts == 1:
        return table
    bucket = id_bucket(table.column(i).combine_chunks(), parts)
    order = np.argsort(bucket, kind="stable")  # file and row order kept within a part
    bounds = np.searchsorted(bucket[order], np.arange(parts + 1))
    table = table.take(pa.array(order))
    return [table.slice(lo, hi - lo) for lo, hi in zip(bounds, bounds[1:])]
