"""What a person sees: the demo's steps print their own progress and summaries, not the engine's logs, and
a real error still reaches the terminal with its cause."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pyarrow.parquet as pq

from pipeline.sample_catalog import make_sample_catalog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 80
ENGINE_NOISE = ("PlacementGroupCleaner", "Reporting training result", "TrainingReport(", "Execution plan of Dataset",
                "Operator ", "logging_progress.py", "streaming_executor.py")


def _run(args: list[str], cwd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DATA_LOGGING_CONFIG")}
    env["PYTHONPATH"] = REPO
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_demo_prints_its_stages_and_summaries_in_under_80_lines(tmp_path):
    out = tmp_path / "demo"
    result = _run(["-m", "jobs.demo", "--out", str(out), "--items", "120", "--steps", "2", "--batch-size", "8",
                   "--preset", "tiny"], cwd=str(tmp_path))
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    lines = text.splitlines()
    assert len(lines) < MAX_LINES, text
    for expected in ("[1/3] sample catalog", "[2/3] pretraining", "step 2/2", "[3/3] nightly job",
                     "embed: 120 rows", "index: ", "dedup: ", "backfill: ", "review page: ", "engine logs"):
        assert expected in text, f"{expected!r} missing from:\n{text}"
    assert not [line for line in lines if any(noise in line for noise in ENGINE_NOISE)], text
    log_dir = text.split("engine logs (Ray, Ray Data, Ray Train): ")[-1].split()[0]
    assert os.path.isdir(log_dir) and os.listdir(log_dir)  # the engine's logs are where the summary says


def test_a_real_error_reaches_the_terminal_with_its_cause(tmp_path, tiny_model_dir):
    """A catalog part that is not Parquet fails inside a Ray Data read task: the user sees which file."""
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    pq.write_table(make_sample_catalog(40, seed=3), catalog / "part-00000.parquet")
    (catalog / "part-00001.parquet").write_bytes(b"this is not parquet" * 100)
    result = _run(["-m", "jobs.cli", "embed", str(catalog), tiny_model_dir, str(tmp_path / "out")], cwd=str(tmp_path))
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "part-00001.parquet" in text, text[-3000:]
    assert len(text.splitlines()) < MAX_LINES, text
    assert not os.path.exists(tmp_path / "out")


def test_quiet_and_verbose_use_the_engines_own_switches(monkeypatch):
    """Quiet: Ray Data reads our logging config (console at WARNING, file at DEBUG); verbose: Ray's own."""
    import yaml

    from jobs import runtime

    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    runtime.configure_output(verbose=True)
    assert "RAY_DATA_LOGGING_CONFIG" not in os.environ
    runtime.configure_output(verbose=False)
    config = yaml.safe_load(open(os.environ["RAY_DATA_LOGGING_CONFIG"]))
    assert config["handlers"]["console"]["level"] == "WARNING" and config["loggers"]["ray.data"]["level"] == "DEBUG"
    assert set(config["loggers"]["ray.data"]["handlers"]) == {"file", "console"}
    assert logging.getLogger("pipeline.embed").getEffectiveLevel() == logging.INFO  # our progress lines show


def test_a_progress_end_line_is_not_a_repeat_of_the_last_one(caplog):
    from pipeline.progress import Progress

    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        done = Progress(log, "embed", 10, every_s=0.0)
        done.update(10)  # the periodic line already says 10/10
        done.finish()
        cut = Progress(log, "embed", 10, every_s=3600.0)
        cut.update(4)  # no periodic line yet: the end line is the only one
        cut.finish()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["embed: 10/10 rows (100%)", "embed: 4/10 rows (40%)"]
