"""Shared fixtures: a local Ray, and a generated embedding table with its sharded index."""

from __future__ import annotations

import pytest
import ray

from tests.index_data import Catalog, make_catalog, write_embedding_table


@pytest.fixture(scope="session")
def ray_local():
    """Local Ray on 2 CPUs for the session (modules that need other Ray settings define their own)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def index_catalog() -> Catalog:
    return make_catalog()


@pytest.fixture(scope="session")
def embeddings_uri(tmp_path_factory, index_catalog) -> str:
    uri = str(tmp_path_factory.mktemp("emb") / "embeddings")
    write_embedding_table(uri, index_catalog.item_ids, index_catalog.vectors)
    return uri


@pytest.fixture(scope="session")
def ivf_index_uri(tmp_path_factory, embeddings_uri, ray_local) -> str:
    """An approximate index (IVF, tuned nprobe) over the generated catalog, 3 shards."""
    from pipeline.index_build import IndexBuildConfig, build_index

    uri = str(tmp_path_factory.mktemp("idx") / "ivf")
    build_index(embeddings_uri, uri, IndexBuildConfig(n_shards=3, spec="IVF64,Flat", n_eval_queries=300, n_tune_queries=200))
    return uri
