"""The dependency rule, read from the source: imports only point down the layers.

    item_model  <-  pipeline  <-  jobs (the nightly, the demo, the command line)

item_model knows nothing of Ray, pipeline or jobs; pipeline knows nothing of jobs.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ["item_model", "pipeline", "jobs"]  # bottom to top
FORBIDDEN = {"item_model": {"ray"}}  # third-party packages a layer must not use


def imported_modules(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, function-level ones included."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                found.append((node.lineno, node.module))
    return found


def arrows_up() -> list[str]:
    bad = []
    for level, layer in enumerate(LAYERS):
        above = set(LAYERS[level + 1 :]) | FORBIDDEN.get(layer, set())
        for path in sorted((ROOT / layer).rglob("*.py")):
            for line, module in imported_modules(path):
                if module.split(".")[0] in above:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


def test_imports_only_point_down_the_layers():
    assert arrows_up() == []


def test_the_check_sees_an_arrow_that_points_up(tmp_path, monkeypatch):
    """The rule must be able to fail: a pipeline module importing jobs is reported."""
    fake = tmp_path / "pipeline"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from jobs.nightly import run_nightly\n")
    (tmp_path / "item_model").mkdir()
    (tmp_path / "item_model" / "m.py").write_text("from . import config\nimport ray\n")
    (tmp_path / "jobs").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert arrows_up() == ["item_model/m.py:2 imports ray", "pipeline/bad.py:2 imports jobs.nightly"]


def test_the_command_line_starts_without_torch_or_transformers():
    """`item-pipeline --help` must not wait seconds for the model stack: heavy imports happen in commands."""
    code = "import sys, jobs.cli; print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_what_rays_workers_unpickle_loads_without_torch():
    """Ray pickles the jobs' batch classes and functions by reference: each read, write and actor process imports
    their modules to run them. Those modules must not load torch or Ray Train (~5-7 s per process on 2 cores;
    docs/benchmarks.md, start-up); only the encode actor and the training worker need them."""
    modules = "pipeline.rows, pipeline.embed, pipeline.catalog, pipeline.storage, pipeline.id_shuffle, pipeline.dedup, pipeline.backfill"
    code = f"import sys, {modules}; print(sorted(m for m in ('torch', 'ray.train', 'item_model.modeling') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
