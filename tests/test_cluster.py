"""The cluster path, run for real: a two-node Ray cluster on this machine (Ray's own multi-node test utility,
`ray.cluster_utils.Cluster`: one raylet per node), the nightly job submitted with `ray job submit` as the
README says, catalog, model dir and outputs on the S3 server (moto over HTTP). The outputs must equal a
single-node run's, and the work must have run on both nodes."""

from __future__ import annotations

import os
import socket
import subprocess

import numpy as np
import pyarrow.parquet as pq
import ray
import yaml
from click.testing import CliRunner

from jobs.cli import main
from pipeline import storage
from pipeline.sample_catalog import make_sample_catalog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAY = "2026-11-20"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster():
    """Head (with the job server) + one worker node, 2 logical CPUs each; both inherit the S3 variables."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True, "dashboard_port": port})
    nodes.add_node(num_cpus=2)
    nodes.wait_for_nodes()
    return nodes, f"http://127.0.0.1:{port}"


def _config(path, root: str, encode_actors: int) -> str:
    """The test's nightly config: only resources differ between the runs (as between laptop and cluster)."""
    data = {"catalog": f"{root}/catalog/", "model_dir": f"{root}/model", "output_root": f"{root}/runs",
            # fp32: the two runs batch rows differently, and bf16's rounding depends on the batch
            "embed": {"batch_size": 32, "encode_actors": encode_actors, "encode_threads": 1, "precision": "fp32"},
            "index": {"shards": 2, "min_recall": 0.5},
            "dedup": {"threshold": 0.995, "calibrate_precision": 0}}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _rows(uri: str, columns: list[str]) -> list[tuple]:
    fs, _ = storage.get_fs(uri)
    table = pq.read_table(storage.parquet_files(uri), filesystem=fs, columns=columns)
    return sorted(zip(*[table.column(c).to_pylist() for c in columns]), key=repr)


def test_nightly_submitted_to_a_two_node_cluster_equals_a_single_node_run(s3_env, ray_local, tiny_model_dir, tmp_path):
    fs, _ = storage.get_fs("s3://cluster")
    fs.mkdir("cluster")
    catalog = tmp_path / "catalog.parquet"
    pq.write_table(make_sample_catalog(160, seed=11), catalog)
    for root in ("cluster/multi", "cluster/single"):
        fs.put(str(catalog), f"{root}/catalog/part-00000.parquet")
        fs.put(tiny_model_dir, f"{root}/model", recursive=True)

    # the reference: the same command on one node (the suite's local Ray), before the cluster exists
    single = CliRunner().invoke(main, ["nightly", "--config", _config(tmp_path / "single.yaml", "s3://cluster/single", 1),
                                       "--date", DAY])
    assert single.exit_code == 0, single.output[-4000:]

    nodes, dashboard = start_cluster()
    try:
        # the README's command, with the test's cluster and config
        submit = ["ray", "job", "submit", "--address", dashboard, "--working-dir", REPO, "--", "item-pipeline",
                  "nightly", "--config", _config(tmp_path / "multi.yaml", "s3://cluster/multi", 2), "--date", DAY]
        job = subprocess.run(submit, capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]

        # the work ran on both nodes: Ray's state API lists the job's tasks and actors with their node
        from ray.util.state import list_actors, list_tasks

        actors = [a.node_id for a in list_actors(address=nodes.address, limit=10_000)
                  if "MapBatches(Encoder)" in (a.class_name or "")]
        tasks = [t.node_id for t in list_tasks(address=nodes.address, limit=10_000) if "Preprocess" in (t.name or "")]
        # (an actor Ray Data asked for but cancelled before it was placed is listed without a node)
        assert len({node for node in actors + tasks if node}) == 2, (actors, tasks)
    finally:
        nodes.shutdown()

    multi, one = (f"s3://cluster/{r}/runs/dt={DAY}" for r in ("multi", "single"))
    assert storage.read_json(f"{multi}/report.json")["counts"] == storage.read_json(f"{one}/report.json")["counts"]
    a, b = (_rows(f"{run}/embeddings", ["item_id", "content_hash", "embedding"]) for run in (multi, one))
    assert [r[:2] for r in a] == [r[:2] for r in b]
    np.testing.assert_allclose(np.array([r[2] for r in a]), np.array([r[2] for r in b]), atol=1e-5)
    for stage, cols in [("dedup/duplicate_pairs", ["item_id", "dup_item_id"]), ("dedup/duplicate_clusters", ["item_id", "cluster_id"]),
                        ("backfill", ["item_id", "predicted_category"])]:
        assert _rows(f"{multi}/{stage}", cols) == _rows(f"{one}/{stage}", cols), stage
