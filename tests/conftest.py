"""Shared fixtures: local Ray, a tiny model dir (fresh tokenizer, random weights), and a generated
embedding table with its sharded index; and how the test process ends."""

from __future__ import annotations

import os
import sys

import pytest
import ray
import torch

from item_model import ItemModel, ItemProcessor, preset_config, save_model_dir, train_tokenizer
from item_model.training import TrainConfig
from pipeline.sample_catalog import make_sample_catalog
from tests.index_data import Catalog, make_catalog, write_embedding_table

TINY_CATALOG_ROWS = 120  # enough for every defect kind (>= MIN_ROWS_FOR_ALL_DEFECTS)


@pytest.fixture(scope="session")
def s3_env():
    """A moto S3 server on 127.0.0.1 (real HTTP), one for the whole suite (each module uses its own bucket),
    and the AWS_* variables that point s3fs / botocore at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield env
    server.stop()


@pytest.fixture(scope="session")
def _ray_for_the_suite():
    """Shuts down the local Ray that `ray_local` started, once, at the end of the suite."""
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_for_the_suite, s3_env):
    """Local Ray on 2 CPUs, its workers inheriting the S3 variables: started by the first module that needs it
    and kept for the next ones (starting Ray and its worker processes again cost every module ~5-10 s). A module
    that shuts Ray down (the cluster test starts its own) leaves the next one to start it again."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": s3_env})
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A complete model dir of the tiny preset, its tokenizer trained on sample-catalog titles and its
    corpus centre and whitening fitted on them, as pretraining leaves every model dir (random weights
    otherwise: their uncentred vectors all point one way, which the dedup stage's sanity gate rightly
    refuses)."""
    catalog = make_sample_catalog(TINY_CATALOG_ROWS, seed=123)
    titles = catalog.column("title").to_pylist()
    tok = train_tokenizer(titles, vocab_size=300)
    model = ItemModel(preset_config("tiny", tok)).eval()
    processor = ItemProcessor(tok, image_size=model.config.image_size, max_title_len=model.config.max_title_len)
    inputs = processor(titles, catalog.column("image").to_pylist())
    model.fit_embedding_space([{k: torch.from_numpy(v) for k, v in inputs.items() if k != "image_error"}],
                              whiten_shrink=TrainConfig.whiten_shrink)
    directory = str(tmp_path_factory.mktemp("tiny-model"))
    save_model_dir(model, processor, directory)
    return directory


@pytest.fixture(scope="session")
def index_catalog() -> Catalog:
    return make_catalog()


@pytest.fixture(scope="session")
def embeddings_uri(tmp_path_factory, index_catalog) -> str:
    uri = str(tmp_path_factory.mktemp("emb") / "embeddings")
    write_embedding_table(uri, index_catalog.item_ids, index_catalog.vectors)
    return uri


@pytest.fixture(scope="module")
def ivf_index_uri(tmp_path_factory, embeddings_uri, ray_local) -> str:
    """An approximate index (IVF, tuned nprobe) over the generated catalog, 3 shards."""
    from pipeline.index_build import IndexBuildConfig, build_index

    uri = str(tmp_path_factory.mktemp("idx") / "ivf")
    build_index(embeddings_uri, uri, IndexBuildConfig(n_shards=3, spec="IVF64,Flat", n_eval_queries=300, n_tune_queries=200))
    return uri


# --- how the test process ends ---------------------------------------------------------------------------

_session: list[pytest.Session] = []


def pytest_sessionfinish(session: pytest.Session) -> None:
    _session.append(session)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the process with pytest's exit status once pytest is done (summary printed, cache written), not in
    the interpreter's own shutdown: there, now and then, a native library's background thread calls into
    freed memory after every test has passed (the kernel log: `segfault at X ip X`, a jump to a freed
    address from a thread's stack), and the process dies with SIGSEGV instead of 0. Failures keep their
    status; only that shutdown is skipped."""
    if _session:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(_session[0].exitstatus))
