"""The review page of a nightly run: one static HTML file a person opens to judge the day's results.

    RUN_DIR/review.html   the day's counts; the largest duplicate clusters with thumbnails, titles and
                          similarities; pairs just above and just below the dedup threshold (where a person
                          decides whether the threshold is right); backfill examples per confidence band

Thumbnails are embedded as data URIs, so the page needs no server and opens from S3 or a laptop. The
catalog is the one the run's embedding table names in its manifest; only the listings shown are read.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps

from item_model.processor import to_rgb

from . import storage
from .catalog import ColumnMap, id_as_string, open_dataset
from .embedding_scan import gather, num_rows
from .index import ShardByShard

REVIEW = "review.html"
THUMB_PX = 112
CONFIDENCE_BANDS = ((0.0, 0.7), (0.7, 0.9), (0.9, 1.01))  # backfill confidence: [lo, hi)


def thumbnail(data: bytes | None, size: int = THUMB_PX) -> str | None:
    """Image bytes -> a JPEG data URI of at most size x size; None when there is no usable image."""
    if not data:
        return None
    try:
        im = Image.open(io.BytesIO(data))
        im = to_rgb(ImageOps.exif_transpose(im))
        im.thumbnail((size, size))
    except Exception:  # any undecodable image is shown as "no image", never as a broken one
        return None
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def read_listings(catalog_uri: str, columns: ColumnMap, item_ids: list[str]) -> dict[str, dict[str, Any]]:
    """item_id -> {title, image (bytes or None)} for the listings shown (a pushed-down id filter)."""
    dataset = open_dataset(catalog_uri)
    have = dataset.schema.names
    image_col = columns.image if columns.image in have else columns.image_uri
    wanted = [c for c in (columns.item_id, columns.title, image_col) if c in have]
    table = dataset.to_table(columns=wanted, filter=pc.field(columns.item_id).cast(pa.string()).isin(sorted(set(item_ids))))
    ids = id_as_string(table.column(columns.item_id)).to_pylist()
    titles = table.column(columns.title).to_pylist() if columns.title in have else [None] * len(ids)
    images = table.column(image_col).to_pylist() if image_col in have else [None] * len(ids)
    out: dict[str, dict[str, Any]] = {}
    for item_id, title, image in zip(ids, titles, images):
        if item_id in out:  # the embed job's id rule: the first occurrence
            continue
        if image_col == columns.image_uri and image:
            try:
                image = storage.read_bytes(image)
            except Exception:  # a photo that cannot be fetched is shown as "no image"
                image = None
        out[item_id] = {"title": title, "image": image}
    return out


def _clusters(dedup_uri: str, n: int) -> tuple[list[list[str]], pd.DataFrame]:
    pairs = pd.read_parquet(storage.parquet_files(storage.join(dedup_uri, "duplicate_pairs")), filesystem=storage.get_fs(dedup_uri)[0])
    clusters = pd.read_parquet(storage.parquet_files(storage.join(dedup_uri, "duplicate_clusters")), filesystem=storage.get_fs(dedup_uri)[0])
    if clusters.empty:
        return [], pairs
    sizes = clusters.groupby("cluster_id").size().sort_values(ascending=False, kind="stable")
    largest = sizes.index[:n]
    members = [sorted(clusters.loc[clusters["cluster_id"] == c, "item_id"].tolist()) for c in largest]
    return members, pairs


def _below_threshold(index_uri: str, embeddings_uri: str, threshold: float, n: int, seed: int,
                     sample: int = 500, k: int = 6) -> list[tuple[str, str, float]]:
    """The highest-scoring neighbour pairs under the threshold, from a seeded sample of items (rows picked by
    position and streamed out of the table; the index searched one shard at a time: the page's process
    holds neither the table nor the index)."""
    n_rows = num_rows(embeddings_uri)
    if n_rows < 2:
        return []
    chosen = np.random.default_rng(seed).choice(n_rows, min(sample, n_rows), replace=False)
    rows = gather(embeddings_uri, chosen)
    ids, vectors = rows["item_id"], rows["embedding"]
    scores, found = ShardByShard.load(index_uri).search(vectors, k)
    below: dict[tuple[str, str], float] = {}
    for q, own in enumerate(ids):
        for score, other in zip(scores[q], found[q]):
            if other is None or other == own or not np.isfinite(score) or score >= threshold:
                continue
            below[tuple(sorted((str(own), str(other))))] = float(score)
    return [(a, b, s) for (a, b), s in sorted(below.items(), key=lambda kv: -kv[1])[:n]]


def write_review(run_dir: str, report: dict[str, Any] | None = None, per_section: int = 6, seed: int = 0,
                 out_uri: str | None = None) -> str:
    """Build the review page of the run at `run_dir` (its stages published; `report` its run report, read
    from RUN_DIR/report.json when not given) and write it to `out_uri` (default RUN_DIR/review.html);
    returns where it was written."""
    embeddings, index, dedup, backfill = (storage.join(run_dir, s) for s in ("embeddings", "index", "dedup", "backfill"))
    emb_m, dup_m, bf_m = (storage.read_manifest(u) for u in (embeddings, dedup, backfill))
    if report is None:
        report_uri = storage.join(run_dir, "report.json")
        report = storage.read_json(report_uri) if storage.exists(report_uri) else {}
    # None: calibration reached its precision at no threshold and no pairs were published; the page then
    # shows the highest-scoring pairs, all of them uncounted
    threshold = float("inf") if dup_m["threshold"] is None else float(dup_m["threshold"])

    clusters, pairs = _clusters(dedup, per_section)
    above = pairs.sort_values("score", kind="stable").head(per_section)
    above = [(r.item_id, r.dup_item_id, float(r.score)) for r in above.itertuples()]
    below = _below_threshold(index, embeddings, threshold, per_section, seed)
    fills = pd.read_parquet(storage.parquet_files(backfill), filesystem=storage.get_fs(backfill)[0])
    fills = fills[fills["predicted_category"].notna()]
    bands = []
    for lo, hi in CONFIDENCE_BANDS:
        band = fills[(fills["confidence"] >= lo) & (fills["confidence"] < hi)]
        bands.append((lo, min(hi, 1.0), len(band), band.sample(min(per_section, len(band)), random_state=seed)
                      .sort_values("confidence", ascending=False) if len(band) else band))

    shown = [i for c in clusters for i in c[:12]] + [i for p in above + below for i in p[:2]]
    shown += [i for *_, b in bands for i in b["item_id"].tolist()]
    listings = read_listings(emb_m["catalog"], ColumnMap(**emb_m.get("column_map", {})), shown)

    page = _page(run_dir, report, emb_m, dup_m, bf_m, threshold, clusters, pairs, above, below, bands, listings)
    out_uri = out_uri or storage.join(run_dir, REVIEW)
    fs, path = storage.get_fs(out_uri)
    with fs.open(path, "w") as f:
        f.write(page)
    return out_uri


# --- HTML ------------------------------------------------------------------------------------------------


def _card(item_id: str, listings: dict[str, dict], note: str = "") -> str:
    listing = listings.get(item_id, {})
    uri = thumbnail(listing.get("image"))
    picture = f'<img src="{uri}" alt="">' if uri else '<div class="noimg">no image</div>'
    title = html.escape(listing.get("title") or "(no title)")
    extra = f'<div class="note">{html.escape(note)}</div>' if note else ""
    return f'<div class="card">{picture}<div class="title">{title}</div><div class="id">{html.escape(item_id)}</div>{extra}</div>'


def _pair_row(a: str, b: str, score: float, listings: dict) -> str:
    return (f'<div class="pair"><div class="score">cosine {score:.4f}</div>'
            f'<div class="row">{_card(a, listings)}{_card(b, listings)}</div></div>')


def _page(run_dir, report, emb_m, dup_m, bf_m, threshold, clusters, pairs, above, below, bands, listings) -> str:
    if np.isfinite(threshold):
        at = f"cosine >= {threshold:.4f}"
    else:
        cal = dup_m["calibration"]
        at = (f"no threshold: none reaches precision {cal['target_precision']} on the labelled groups (best "
              f"{cal['best_precision']:.3f}, at cosine >= {cal['best_threshold']:.4f})")
    counts = (f"rows in {emb_m['rows_in']:,} = embedded {emb_m['embedded']:,} + unchanged {emb_m['unchanged_skipped']:,} "
              f"+ rejected {emb_m['rejected']:,}; duplicates: {dup_m['n_pairs']:,} pairs in {dup_m['n_clusters']:,} "
              f"clusters at {at}; backfill: {bf_m.get('n_filled', 0):,} of "
              f"{bf_m.get('n_unlabelled', 0):,} uncategorised rows filled")
    parts = [f"<h1>Review: {html.escape(report.get('run_date', run_dir))}</h1>",
             f'<p class="counts">{html.escape(counts)}</p>',
             f"<p>model <code>{html.escape(emb_m['model_version'])}</code>, run dir <code>{html.escape(run_dir)}</code></p>",
             f'<h2>Largest duplicate clusters ({len(clusters)} shown of {dup_m["n_clusters"]:,})</h2>']
    for n, members in enumerate(clusters):
        inside = pairs[pairs["item_id"].isin(members) & pairs["dup_item_id"].isin(members)]["score"]
        sims = f"pair cosine {inside.min():.4f} to {inside.max():.4f}" if len(inside) else ""
        cards = "".join(_card(i, listings) for i in members[:12])
        more = f'<div class="more">+{len(members) - 12} more</div>' if len(members) > 12 else ""
        parts.append(f'<section class="cluster" data-size="{len(members)}"><h3>cluster {n + 1}: {len(members)} listings, '
                     f'{sims}</h3><div class="row">{cards}{more}</div></section>')
    parts.append(f"<h2>At the threshold ({html.escape(at)})</h2><h3>just above: counted as duplicates</h3>")
    parts.append('<div class="pairs">' + ("".join(_pair_row(a, b, s, listings) for a, b, s in above) or "no pairs") + "</div>")
    parts.append("<h3>just below: not counted</h3>")
    parts.append('<div class="pairs">' + ("".join(_pair_row(a, b, s, listings) for a, b, s in below) or "no pairs") + "</div>")
    parts.append("<h2>Category backfill by confidence</h2>")
    for lo, hi, total, band in bands:
        cards = "".join(_card(r.item_id, listings, f"{r.predicted_category} ({r.confidence:.2f})") for r in band.itertuples())
        parts.append(f'<h3>confidence {lo:.1f}-{hi:.1f}: {total:,} fills</h3><div class="row">{cards or "none"}</div>')
    body = "\n".join(parts)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>item-pipeline review {html.escape(report.get('run_date', ''))}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
.row, .pairs {{ display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; margin-bottom: 10px; }}
.pair {{ border: 1px solid #bbb; padding: 6px; }}
.card {{ width: {THUMB_PX + 8}px; font-size: 11px; border: 1px solid #ddd; padding: 4px; background: #fafafa; }}
.card img, .noimg {{ width: {THUMB_PX}px; height: {THUMB_PX}px; object-fit: contain; background: #fff; display: block; }}
.noimg {{ line-height: {THUMB_PX}px; text-align: center; color: #999; border: 1px dashed #ccc; }}
.title {{ margin-top: 3px; font-weight: bold; }} .id, .note {{ color: #666; }}
.score {{ font-weight: bold; margin-bottom: 4px; }} .counts {{ font-size: 15px; }}
</style></head>
<body>
{body}
<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  document.body.dataset.images = images.length;
  document.body.dataset.brokenImages = images.filter(im => !im.complete || im.naturalWidth === 0).length;
}});
</script>
</body></html>
"""
