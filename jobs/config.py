"""The nightly job's configuration: one YAML file, typed and validated before any work.

Unknown keys and wrong types are errors that name the key. Secrets never live here: S3 credentials come
from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for non-AWS stores).
Resources (actor pool sizes, GPUs, shard counts) are decided here and nowhere in pipeline/.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.catalog import ColumnMap


class ConfigError(ValueError):
    """A config problem, with the key's dotted path and what to write instead."""


@dataclass
class EmbedStage:
    batch_size: int = 256  # rows per decode/tokenise task batch and per encode call
    encode_actors: int = 1  # size of the encode actor pool (one per GPU on a GPU cluster)
    gpus_per_actor: float = 0.0  # 1 on GPU workers; 0 encodes on CPU
    encode_threads: int = 0  # torch threads per CPU encode actor; 0 = torch's default
    precision: str = "auto"  # auto (bf16 where the device has it natively: GPUs, recent CPUs), fp32 or bf16


@dataclass
class IndexStage:
    shards: int = 2  # FAISS shards, built in parallel Ray tasks
    spec: str = "auto"  # "auto" or a FAISS index factory string
    min_recall: float = 0.95  # recall@10 vs exact search below which the build fails
    memory_budget_gb: float = 4.0  # for the auto index choice
    # the previous night's index is updated (deleted and edited items removed, new and edited ones added)
    # while the items changed since its last full build stay under this share of that build's vectors and
    # the updated index passes min_recall; otherwise it is rebuilt. 0: rebuild every night
    max_changed_share: float = 0.10


@dataclass
class DedupStage:
    # cosine similarity at or above which two listings are duplicates, where the threshold is not calibrated
    threshold: float = 0.95
    # > 0 and the catalog has labelled duplicate groups (columns.group_id): the threshold is the lowest one
    # that reaches this pair precision on them, recorded in the dedup manifest with the clusters' precision
    # and recall against the groups; 0: always `threshold`
    calibrate_precision: float = 0.9
    k: int = 10  # neighbours examined per listing
    actors: int = 1  # search actors per index shard (each loads its one shard)
    # sanity gate: the stage fails, publishing nothing, when one cluster holds more than this share of the
    # listings (what a collapsed model or a far too low threshold produces)
    max_cluster_share: float = 0.05


@dataclass
class BackfillStage:
    k: int = 10  # labelled neighbours that vote
    min_confidence: float = 0.5  # rows under it stay unfilled and are counted


@dataclass
class NightlyConfig:
    catalog: str  # local path or s3:// URI of the catalog Parquet (file or directory)
    model_dir: str  # a model dir made by `item-pipeline pretrain`
    output_root: str  # run outputs go to OUTPUT_ROOT/dt=YYYY-MM-DD/<stage>/
    columns: ColumnMap = field(default_factory=ColumnMap)  # catalog column names (pipeline.catalog)
    embed: EmbedStage = field(default_factory=EmbedStage)
    index: IndexStage = field(default_factory=IndexStage)
    dedup: DedupStage = field(default_factory=DedupStage)
    backfill: BackfillStage = field(default_factory=BackfillStage)


def _build(cls: type, data: Any, path: str) -> Any:
    """Construct dataclass `cls` from a mapping, checking every key and type, naming `path` on error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'the config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; allowed here: {', '.join(sorted(fields))}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key {path + '.' if path else ''}{missing[0]}")
    values = {}
    for name, value in data.items():
        key, kind = f"{path}.{name}" if path else name, hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, key)
        else:
            values[name] = _check_scalar(kind, value, key)
    return cls(**values)


def _check_scalar(kind: type, value: Any, key: str) -> Any:
    """str, int or float; an int is a fine float, a bool is not a number (YAML's `yes` is a bool)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{key} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def parse_config(data: dict[str, Any]) -> NightlyConfig:
    """Validate a config mapping (the YAML's content) and return the typed config."""
    config = _build(NightlyConfig, data, "")
    for key, value in [("index.shards", config.index.shards), ("embed.encode_actors", config.embed.encode_actors),
                       ("embed.batch_size", config.embed.batch_size), ("dedup.k", config.dedup.k),
                       ("backfill.k", config.backfill.k), ("dedup.actors", config.dedup.actors)]:
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    for key, value in [("index.min_recall", config.index.min_recall), ("dedup.threshold", config.dedup.threshold),
                       ("dedup.calibrate_precision", config.dedup.calibrate_precision),
                       ("dedup.max_cluster_share", config.dedup.max_cluster_share),
                       ("index.max_changed_share", config.index.max_changed_share),
                       ("backfill.min_confidence", config.backfill.min_confidence)]:
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be between 0 and 1, got {value}")
    from pipeline.encode import PRECISIONS

    if config.embed.precision not in PRECISIONS:
        raise ConfigError(f"embed.precision must be one of {', '.join(PRECISIONS)}, got {config.embed.precision!r}")
    return config


def load_config(path: str, **overrides: str) -> NightlyConfig:
    """Read and validate a YAML config; `overrides` (e.g. output_root) replace top-level keys."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(data)
