"""The nightly job end to end: full run, incremental next day, resume after SIGKILL, S3 roots, bad config."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from jobs.config import ConfigError, load_config, parse_config
from jobs.nightly import LATEST, REPORT, STAGES, StageFailed, advance_latest, run_nightly
from pipeline import storage
from pipeline.index import ShardedIndex
from pipeline.sample_catalog import make_sample_catalog

DAY1, DAY2 = dt.date(2026, 11, 20), dt.date(2026, 11, 21)
ROWS = 160
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(path, catalog: str, model_dir: str, output_root: str) -> str:
    data = {
        "catalog": catalog, "model_dir": model_dir, "output_root": output_root,
        "embed": {"batch_size": 64, "encode_threads": 1, "precision": "fp32"},  # search re-embeds rows exactly
        "index": {"shards": 2, "min_recall": 0.5},
        "dedup": {"threshold": 0.995, "calibrate_precision": 0},  # a random tiny model: a fixed threshold
    }
    path.write_text(yaml.safe_dump(data))
    return str(path)


def table_rows(uri: str, columns: list[str]) -> list[tuple]:
    """A published table's rows as sorted tuples (order-free comparison between runs)."""
    table = pq.read_table(storage.parquet_files(uri), columns=columns)
    return sorted(zip(*[table.column(c).to_pylist() for c in columns]), key=repr)


def numeric_ids(table: pa.Table) -> pa.Table:
    """The sample catalog with numbers for ids, written as strings ("1042"; the null id and the duplicated
    ids stay): day 1's catalog, which a catalog with the same ids as int64 must reproduce exactly."""
    numeric = [None if i is None else str(1000 + int(i.split("-")[1])) for i in table.column("item_id").to_pylist()]
    return table.set_column(0, "item_id", pa.array(numeric, pa.string()))


@pytest.fixture(scope="module")
def day1(tmp_path_factory, tiny_model_dir, ray_local):
    root = tmp_path_factory.mktemp("nightly")
    catalog = str(root / "catalog.parquet")
    pq.write_table(numeric_ids(make_sample_catalog(ROWS, seed=11)), catalog)
    config = load_config(write_config(root / "nightly.yaml", catalog, tiny_model_dir, str(root / "runs")))
    return config, run_nightly(config, DAY1)


def test_full_run_publishes_every_output_and_a_reconciling_report(day1):
    config, report = day1
    run = os.path.join(config.output_root, "dt=2026-11-20")
    for stage in STAGES:
        assert storage.is_published(os.path.join(run, stage)), stage
    assert os.path.exists(os.path.join(run, "report.md"))
    c = report["counts"]
    assert report["reconciles"] and c["rows_in"] == ROWS == c["embedded"] + c["rejected"] + c["unchanged_skipped"]
    assert c["unchanged_skipped"] == 0 and c["rejected"] > 0
    assert set(report["rejects_by_reason"]) == {"null_id", "no_content", "duplicate_id"}
    # the recorded recall is that of real neighbours: an exact search over the published table agrees
    table = pq.read_table(storage.parquet_files(os.path.join(run, "embeddings")), columns=["item_id", "embedding"])
    ids = np.array(table.column("item_id").to_pylist(), dtype=object)
    vectors = storage.embedding_matrix(table.column("embedding"))
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    truth = ids[np.argsort(-sims, axis=1, kind="stable")[:, :10]]
    _, found = ShardedIndex.load(os.path.join(run, "index")).search(vectors, 11)
    hits = [len(set([f for f in row if f != own][:10]) & set(t)) for row, own, t in zip(found.tolist(), ids, truth.tolist())]
    assert abs(sum(hits) / (10 * len(ids)) - report["index"]["recall_at_10"]) < 0.02
    assert report["backfill"]["n_unlabelled"] > 0
    assert storage.read_json(os.path.join(config.output_root, LATEST))["run_date"] == "2026-11-20"


def test_a_finished_date_is_not_run_again(day1):
    config, _ = day1
    again = run_nightly(config, DAY1)
    assert again.get("already_complete") is True


def test_next_day_reencodes_only_what_changed(day1, tmp_path):
    config, report1 = day1
    old = pq.read_table(config.catalog)
    keep = pc.and_(pc.is_valid(old["item_id"]), pc.is_null(old["defect"]))  # clean rows only
    base = old.filter(keep)
    rows = base.to_pylist()
    edited = [dict(r, title=r["title"] + " v2") for r in rows[:3]]  # changed title -> re-encode
    removed = rows[3:7]  # gone from the catalog
    added = [dict(r, item_id=f"new-{i}") for i, r in enumerate(rows[7:12])]  # new ids
    broken = [dict(rows[12], item_id="broken-1", title="", image=None)]  # no content -> reject
    day2_rows = edited + rows[7:] + added + broken
    catalog2 = str(tmp_path / "catalog2.parquet")
    pq.write_table(pa.Table.from_pylist(day2_rows, schema=old.schema), catalog2)
    # day 1's rows with a defect that still embeds (no image, no title, bad image) are left out too: 22
    # changes on 154 rows, so the index update limit is raised over that for this night
    config2 = parse_config({**_as_dict(config), "catalog": catalog2,
                            "index": {**_as_dict(config)["index"], "max_changed_share": 0.2}})

    report = run_nightly(config2, DAY2)
    c = report["counts"]
    assert report["previous_embeddings"].endswith("dt=2026-11-20/embeddings")
    assert c["rows_in"] == len(day2_rows)
    assert c["embedded"] == len(edited) + len(added)  # exactly the new and changed rows were encoded
    assert c["unchanged_skipped"] == len(rows[7:])
    assert c["rejected"] == 1 and report["rejects_by_reason"] == {"no_content": 1}
    ids = {r[0] for r in table_rows(os.path.join(report["run_dir"], "embeddings"), ["item_id"])}
    assert not ids & {r["item_id"] for r in removed}
    assert len(ids) == c["embedded"] + c["unchanged_skipped"]  # no row twice
    # tonight's rows have files of their own (the index update reads the new vectors from them alone)
    emb = os.path.join(report["run_dir"], "embeddings")
    fresh = pq.read_table([os.path.join(emb, f) for f in storage.read_manifest(emb)["fresh_files"]], columns=["item_id"])
    assert sorted(fresh.column("item_id").to_pylist()) == sorted(r["item_id"] for r in edited + added)
    # the index was updated in place of a rebuild and holds exactly tonight's rows: the removed ones are
    # gone, the new ones are found
    index = report["index"]
    day1_ids = {r[0] for r in table_rows(os.path.join(report1["run_dir"], "embeddings"), ["item_id"])}
    deleted = len(day1_ids - ids)
    assert index["mode"] == "update", index
    assert index["changes"] == {"added": len(added), "edited": len(edited), "deleted": deleted}
    shards = ShardedIndex.load(os.path.join(report["run_dir"], "index"))
    assert set(np.concatenate([s.item_ids for s in shards.shards]).tolist()) == ids
    with open(os.path.join(report["run_dir"], "report.md")) as f:
        assert f"updated: {len(added)} added, {len(edited)} edited, {deleted} deleted" in f.read()
    # the modality balance counts the whole table and stands beside the previous night's figures
    balance = report["modality_balance"]
    assert sum(balance["counts"].values()) == len(ids)
    assert balance["previous"]["image_share"] == report1["modality_balance"]["image_share"]
    assert storage.read_json(os.path.join(config.output_root, LATEST))["run_date"] == "2026-11-21"


def test_latest_only_moves_forward_and_a_stale_pointer_is_repaired(tmp_path):
    runs = tmp_path / "runs"
    config = parse_config({"catalog": "c", "model_dir": "m", "output_root": str(runs)})
    for day in ("2026-11-19", "2026-11-20", "2026-11-22"):
        (runs / f"dt={day}").mkdir(parents=True)
    (runs / "dt=2026-11-21").mkdir()  # a killed run: no report
    for day in ("2026-11-19", "2026-11-20"):
        storage.write_json(str(runs / f"dt={day}" / REPORT), {"run_date": day})
    assert advance_latest(config)["run_date"] == "2026-11-20"
    # a crash between the report and the pointer: 11-22 finished but latest.json still names 11-20
    storage.write_json(str(runs / "dt=2026-11-22" / REPORT), {"run_date": "2026-11-22"})
    assert storage.read_json(str(runs / LATEST))["run_date"] == "2026-11-20"
    assert advance_latest(config) == {"run_date": "2026-11-22", "run_dir": str(runs / "dt=2026-11-22")}
    # an older date finishing later (a re-run, a back-fill) never moves it back
    storage.write_json(str(runs / "dt=2026-11-21" / REPORT), {"run_date": "2026-11-21"})
    assert advance_latest(config)["run_date"] == "2026-11-22"
    assert storage.read_json(str(runs / LATEST))["run_date"] == "2026-11-22"


def _as_dict(config) -> dict:
    import dataclasses
    return dataclasses.asdict(config)


def test_killed_run_resumes_to_the_same_outputs(day1, tmp_path):
    """SIGKILL the CLI mid-run (after the index is published), re-run, compare with the full run."""
    config, _ = day1
    runs = str(tmp_path / "runs")
    cfg = write_config(tmp_path / "nightly.yaml", config.catalog, config.model_dir, runs)
    cmd = [sys.executable, "-m", "jobs.cli", "nightly", "--config", cfg, "--date", "2026-11-20"]
    env = {**os.environ, "PYTHONPATH": REPO, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    index_manifest = os.path.join(runs, "dt=2026-11-20", "index", storage.MANIFEST)
    deadline = time.monotonic() + 240
    while not os.path.exists(index_manifest) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run = os.path.join(runs, "dt=2026-11-20")
    assert not os.path.exists(os.path.join(run, REPORT)) and not os.path.exists(os.path.join(runs, LATEST))

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = storage.read_json(os.path.join(run, REPORT))
    assert {"embeddings", "index"} <= set(report["stages_resumed"])
    assert not [p for p in os.listdir(run) if ".staging-" in p]
    full = os.path.join(config.output_root, "dt=2026-11-20")
    for stage, cols in [("embeddings", ["item_id", "embedding", "content_hash", "modalities"]),
                        ("dedup/duplicate_pairs", ["item_id", "dup_item_id", "score"]),
                        ("dedup/duplicate_clusters", ["item_id", "cluster_id"]),
                        ("backfill", ["item_id", "predicted_category", "confidence"])]:
        assert table_rows(os.path.join(run, stage), cols) == table_rows(os.path.join(full, stage), cols), stage


def test_same_job_on_s3_roots(day1, s3_env):
    """Catalog and every output on s3:// (moto over HTTP): the same counts as the local run."""
    config, local = day1
    fs, _ = storage.get_fs("s3://nightly")
    fs.mkdir("nightly")
    fs.put(config.catalog, "nightly/catalog/part-00000.parquet")
    s3 = parse_config({**_as_dict(config), "catalog": "s3://nightly/catalog", "output_root": "s3://nightly/runs"})
    report = run_nightly(s3, DAY1)
    assert report["counts"] == local["counts"]
    assert report["dedup"]["pairs"] == local["dedup"]["pairs"]
    for stage in STAGES:
        assert storage.is_published(f"s3://nightly/runs/dt=2026-11-20/{stage}"), stage
    assert storage.read_json("s3://nightly/runs/latest.json")["run_date"] == "2026-11-20"


def test_a_failing_stage_is_named_and_publishes_no_report(day1, tmp_path):
    config, _ = day1
    bad = parse_config({**_as_dict(config), "output_root": str(tmp_path / "runs"), "model_dir": str(tmp_path / "none")})
    with pytest.raises(StageFailed, match="stage 'embeddings'"):
        run_nightly(bad, DAY1)
    assert not os.path.exists(os.path.join(bad.output_root, "dt=2026-11-20", REPORT))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"index": {"shardz": 2}}, "unknown key index.shardz"),
        ({"embed": {"batch_size": "big"}}, "embed.batch_size must be int"),
        ({"dedup": {"threshold": 1.5}}, "dedup.threshold must be between 0 and 1"),
        ({"embed": {"precision": "fp16"}}, "embed.precision must be one of auto, fp32, bf16, got 'fp16'"),
        ({"catalogue": "x"}, "unknown key catalogue"),
        ({"columns": {"sku": "id"}}, "unknown key columns.sku"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(tmp_path, change, message):
    data = {"catalog": "c", "model_dir": "m", "output_root": "o", **change}
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_cli_rejects_a_bad_config_before_any_work(tmp_path):
    from click.testing import CliRunner

    from jobs.cli import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("catalog: c\nmodel_dir: m\noutput_root: o\nindex:\n  shards: two\n")
    result = CliRunner().invoke(main, ["nightly", "--config", str(cfg)])
    assert result.exit_code == 1 and "index.shards must be int" in result.output


@pytest.mark.parametrize("name", ["nightly.yaml", "nightly-cluster.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(os.path.join(REPO, "jobs", name))
    assert config.index.shards >= 1


def test_cluster_yaml_has_head_gpu_and_cpu_workers_and_every_key_commented():
    path = os.path.join(REPO, "cluster.yaml")
    cluster = yaml.safe_load(open(path))
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types and {"gpu_worker", "cpu_worker"} <= set(types)
    assert any("pip install" in c for c in cluster["setup_commands"])
    lines = open(path).read().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "-")) and ":" in stripped:
            commented = "#" in line or lines[i - 1].strip().startswith("#") or i + 1 < len(lines) and (
                lines[i + 1].strip().startswith("#"))
            assert commented, f"cluster.yaml line {i + 1} has no comment: {line}"


def test_search_a_new_listing_by_title_and_image(day1, tmp_path):
    """A listing given as title + image file is embedded with the index's model exactly as the job
    embedded it, and searched over all shards."""
    from click.testing import CliRunner

    from jobs.cli import main
    from pipeline.encode import embed_listing
    from pipeline.index import read_embedding_table

    config, _ = day1
    rows = pq.read_table(config.catalog).to_pylist()
    row = next(r for r in rows if r["defect"] is None and r["image"] and r["title"])
    run = os.path.join(config.output_root, "dt=2026-11-20")
    _, stored, _ = read_embedding_table(os.path.join(run, "embeddings"), item_ids=[row["item_id"]])
    np.testing.assert_allclose(embed_listing(config.model_dir, row["title"], row["image"], "fp32"), stored, atol=1e-5)

    image = tmp_path / "listing.jpg"
    image.write_bytes(row["image"])
    index = os.path.join(run, "index")
    result = CliRunner().invoke(main, ["search", index, "--title", row["title"], "--image", str(image), "--k", "3", "--json"])
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] > 0.9999
    result = CliRunner().invoke(main, ["search", index, "--title", ""])
    assert result.exit_code != 0 and "no usable title and no usable image" in result.output


def test_integer_ids_and_renamed_columns_give_the_same_outputs(day1, tmp_path):
    """One catalog reader and one id rule in every stage: int64 ids with a null, every column renamed
    through the config's column map, give exactly the outputs of day 1's catalog (the same ids as strings)."""
    config, canonical = day1
    table = pq.read_table(config.catalog)
    numeric = table.column("item_id").to_pylist()
    assert None in numeric and len(set(numeric)) < len(numeric)  # a null id and duplicate ids
    renames = {"item_id": "sku", "title": "name", "image": "photo", "category": "cat", "group_id": "product"}
    renamed = table.set_column(0, "item_id", pa.array([None if i is None else int(i) for i in numeric], pa.int64()))
    renamed = renamed.rename_columns([renames.get(c, c) for c in renamed.column_names])
    catalog = str(tmp_path / "renamed.parquet")
    pq.write_table(renamed, catalog)
    data = yaml.safe_load(open(write_config(tmp_path / "renamed.yaml", catalog, config.model_dir, str(tmp_path / "runs"))))
    report = run_nightly(parse_config({**data, "columns": renames}), DAY1)

    def outputs(report: dict) -> tuple:
        return (
            report["counts"], report["backfill"],
            table_rows(os.path.join(report["run_dir"], "embeddings"), ["item_id", "modalities", "content_hash"]),
            table_rows(os.path.join(report["run_dir"], "dedup", "duplicate_pairs"), ["item_id", "dup_item_id"]),
            table_rows(os.path.join(report["run_dir"], "backfill"), ["item_id", "predicted_category"]),
        )

    assert outputs(report) == outputs(canonical)
    counts, backfill, embedded = outputs(canonical)[:3]
    assert backfill["n_unlabelled"] > 0 and backfill["n_no_embedding"] == 0  # ids matched across stages
    assert all(isinstance(i, str) and not i.endswith(".0") for i, _, _ in embedded)
    # the next night, same catalog: the join on int64 ids finds every row unchanged
    again = run_nightly(parse_config({**data, "columns": renames}), DAY2)["counts"]
    assert (again["embedded"], again["unchanged_skipped"], again["rejected"]) == (0, counts["embedded"], counts["rejected"])


# --- what a person sees: modality balance, the review page ----------------------------------------------


def test_report_carries_the_modality_balance(day1):
    config, report = day1
    b = report["modality_balance"]
    assert sum(b["counts"].values()) == report["counts"]["embedded"]
    assert set(b["counts"]) <= {"image+title", "title", "image"}
    assert b["sample"] > 20 and 0.0 <= b["image_share"] <= 1.0 and b["title_movement"] > 0
    assert b["previous"] is None and b["flag"] is None  # the first night has nothing to compare with
    text = open(os.path.join(report["run_dir"], "report.md")).read()
    assert f"image share {b['image_share']:.3f}" in text and "title only" in text


def test_the_balance_sample_is_the_lowest_hash_ids_streamed_over_batches(tmp_path):
    import heapq

    from pipeline.balance import _id_rank, lowest_hash_ids

    ids = [f"id-{i}" for i in range(3000)]
    (tmp_path / "cat").mkdir()
    for f, part in enumerate((ids[:1500] + [None, "id-7"], ids[1500:] + ["id-7"])):  # a duplicate, a null
        pq.write_table(pa.table({"item_id": part}), tmp_path / "cat" / f"part-{f}.parquet", row_group_size=200)
    assert lowest_hash_ids(str(tmp_path / "cat"), "item_id", 40) == heapq.nsmallest(40, ids, key=_id_rank)


def test_a_large_change_in_modality_balance_is_flagged():
    from pipeline.balance import compare_nights

    yesterday = {"title_movement": 0.4, "image_movement": 0.2, "image_share": 0.33, "counts": {}}
    steady = compare_nights({**yesterday, "image_share": 0.36}, yesterday)
    assert steady["flag"] is None and steady["previous"]["image_share"] == 0.33
    dropped = compare_nights({**yesterday, "image_movement": 0.01, "image_share": 0.02}, yesterday)
    assert "image share moved -0.31" in dropped["flag"]


def test_review_page_shows_the_largest_clusters_with_their_photos(day1):
    config, report = day1
    page = open(report["review"]).read()
    clusters = pq.read_table(storage.parquet_files(os.path.join(report["run_dir"], "dedup", "duplicate_clusters"))).to_pandas()
    sizes = sorted(clusters.groupby("cluster_id").size().tolist(), reverse=True)[:6]
    shown = [int(s) for s in re.findall(r'<section class="cluster" data-size="(\d+)"', page)]
    assert shown == sizes and shown  # the largest clusters, largest first
    assert page.count('src="data:image/jpeg;base64,') >= 2 * len(shown)  # thumbnails embedded: no server needed
    assert "just above" in page and "just below" in page and "confidence" in page


def test_a_night_whose_calibration_reaches_no_threshold_says_so_and_reviews_the_closest_pairs(day1, tmp_path):
    """Labels the vectors cannot match (the groups shuffled): the dedup stage publishes no pairs instead of
    failing the night; the report names the best precision there was, and the review page still shows the
    highest-scoring pairs, none of them counted."""
    from jobs.nightly import build_report, report_markdown, stage_summary
    from pipeline.dedup import read_groups, run_dedup
    from pipeline.review import write_review

    config, report = day1
    run_dir = str(tmp_path / "run")
    shutil.copytree(report["run_dir"], run_dir)
    groups = read_groups(config.catalog)
    shuffled = pd.Series(np.random.default_rng(0).permutation(groups.to_numpy(dtype=object)), index=groups.index)
    dedup = os.path.join(run_dir, "dedup")
    run_dedup(os.path.join(run_dir, "index"), os.path.join(run_dir, "embeddings"), dedup, None, 5, (shuffled, 0.9),
              overwrite=True)
    manifests = {stage: storage.read_manifest(os.path.join(run_dir, stage)) for stage in STAGES}
    text = report_markdown(build_report(DAY1, run_dir, None, manifests, {}, []))
    assert "duplicates: NONE PUBLISHED: no threshold reaches precision 0.9" in text, text
    assert manifests["dedup"]["threshold"] is None and manifests["dedup"]["n_pairs"] == 0
    # the night's log line for the stage (it raised on the null threshold before)
    assert stage_summary("dedup", manifests["dedup"]).startswith("no pairs published: no threshold reaches precision 0.9")

    page = open(write_review(run_dir, out_uri=str(tmp_path / "review.html"))).read()
    assert "no threshold: none reaches precision 0.9" in page
    below = page[page.index("just below"):page.index("Category backfill")]
    assert below.count('class="pair"') >= 1  # the closest pairs, shown as not counted


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs the Debian package chromium (apt-get install chromium; "
                    ".ci/run installs it)")
def test_review_page_renders_in_a_real_browser(day1, tmp_path):
    """Headless Chromium opens the page from disk: every image decodes (none broken) and the screenshot
    holds the photos (not a blank page)."""
    from PIL import Image

    _, report = day1
    url = "file://" + os.path.abspath(report["review"])
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*args, "--virtual-time-budget=5000", "--dump-dom", url], capture_output=True, text=True, timeout=120)
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stderr[-2000:]
    images = int(re.search(r'data-images="(\d+)"', body.group(0)).group(1))
    broken = int(re.search(r'data-broken-images="(\d+)"', body.group(0)).group(1))
    assert images > 10 and broken == 0
    shot = tmp_path / "review.png"
    subprocess.run([*args, "--window-size=1200,1600", f"--screenshot={shot}", url], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    colourful = (pixels.max(axis=2) - pixels.min(axis=2)) > 40  # drawn product photos, not text on white
    assert colourful.mean() > 0.01
