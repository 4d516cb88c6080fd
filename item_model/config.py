"""ItemConfig: every architectural and pretraining choice of the ITEm model, and its named presets.

The paper (Liao et al., arXiv 2311.02084) was not available to us in full: masking ratios, loss weights
and sizes below are our choices, marked as such.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import BertConfig

from .presets import PRESETS, VARIANTS

ARCHITECTURES = ("single_stream", "two_stream")
MODALITIES = ("image+title", "title", "image")
POOLINGS = ("cls", "mean")
PATCH_STEMS = ("linear", "conv", "conv_image")
BACKDROPS = ("light", "any")
# Token ids that must agree with the tokenizer are never defaulted: `preset_config` reads them from the
# tokenizer, and `ItemModel` refuses a config where they are unset.
_FROM_TOKENIZER = ("vocab_size", "pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id")


@strict
class ItemConfig(BertConfig):
    """A BERT config (so the encoder layers are transformers' own and a BERT checkpoint can initialise
    them) extended with the image stream and the five pretraining objectives. transformers 5 configs are
    typed dataclasses: every field below is validated on construction and saved in config.json."""

    model_type = "item"

    # --- text stream (vocab and special ids come from the tokenizer, see preset_config) ---
    vocab_size: int | None = None  # WordPiece vocab size; must equal the tokenizer's
    pad_token_id: int | None = None  # [PAD] id in the tokenizer
    cls_token_id: int | None = None  # [CLS] id: its final state is the product embedding
    sep_token_id: int | None = None  # [SEP] id, closes the title
    mask_token_id: int | None = None  # [MASK] id used by MLM
    max_title_len: int = 32  # title tokens incl. [CLS] and [SEP]; longer titles are truncated
    # --- image stream ---
    image_size: int = 64  # images are letterboxed to image_size x image_size RGB
    patch_size: int = 8  # ViT-style square patches (no region detector)
    # how a patch becomes a token: "linear" (ViT's projection of its raw pixels), "conv" (a small
    # convolutional net over each patch on its own) or "conv_image" (the same net over the whole photo:
    # each token also sees the borders of its neighbours); for both conv stems patch_size is a power of two
    patch_stem: str = "linear"
    num_channels: int = 3  # RGB
    # --- masking (our choices) ---
    mlm_probability: float = 0.15  # BERT's share of title tokens to predict (80/10/10 rule)
    mim_probability: float = 0.25  # share of image patches replaced by a learned [MASK] patch
    itm_swap_probability: float = 0.5  # share of rows whose image is swapped for ITM
    # share of rows trained with one modality dropped, so that embedding a row with a missing image
    # or an empty title is in-distribution
    modality_dropout: float = 0.1
    # --- the product embedding ---
    # "cls": the final [CLS] state (the paper's); "mean": the mean of every attended final state (title
    # tokens incl. [CLS]/[SEP], and the patches when there is an image), as sentence-transformers pool
    pooling: str = "cls"
    # --- objectives: each has an on/off switch and a weight (weights are our choices) ---
    use_itm: bool = True  # image-text matching on [CLS]
    use_mlm: bool = True  # masked language modelling from each masked slot's own state
    use_mim: bool = True  # masked image modelling (normalised-pixel regression) per slot
    use_global_mlm: bool = True  # masked words from [CLS] + slot position only
    use_global_mim: bool = True  # masked patches from [CLS] + slot position only
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    mim_weight: float = 1.0
    global_mlm_weight: float = 1.0
    global_mim_weight: float = 1.0
    # --- which inputs and which architecture: the baselines of EVALUATION.md are these switches ---
    architecture: str = "single_stream"  # "single_stream" (ITEm) | "two_stream" (see two_stream.py)
    modalities: str = "image+title"  # "title" | "image": a single-modality model ignores the other input
    use_contrastive: bool = False  # two_stream only: CLIP-style InfoNCE between title and image
    contrastive_weight: float = 1.0
    # --- beyond the paper: view consistency (our addition, switchable like the five objectives) ---
    # In-batch InfoNCE that pulls the pooled embedding of the (masked) joint view of a listing towards an
    # image-only view of it (an independently augmented photo) and a title-only view (tokens dropped):
    # a re-listing with a new title must still be found by its photo, and the reverse.
    use_view_contrastive: bool = False
    view_contrastive_weight: float = 1.0
    # the pooling of the vectors the view term pulls together ("cls" | "mean"); the published vector is
    # `pooling`. Measured (docs/evaluation.md): the term on the mean of the states, published by [CLS], was best
    # in run 3; with run 5's backdrop views, publishing the (centred) mean was better on re-listings (run 6)
    view_pooling: str = "mean"
    contrastive_temperature: float = 0.05  # InfoNCE temperature (our choice; CLIP learns it, we fix it)
    # also pull each row's image-only view towards its title-only view (CLIP's term, symmetric, inside the
    # single stream), weighted by this (0: off): the photo alone must carry what the title says of the product
    view_cross_weight: float = 0.0
    view_token_drop: float = 0.2  # share of title words dropped in the title-only view
    view_crop_scale_min: float = 0.5  # image-only view: random resized crop keeping >= this share of the area
    # image-only view re-framing: zoomed out to as little as 1 - this of the side, rotated by up to this
    # many degrees (off by default: run 2 in docs/evaluation.md measured no gain from them)
    view_zoom_out_max: float = 0.0
    view_rotation_max_deg: float = 0.0
    # the zoom-out's backdrop: "light" (grey to white, as catalog photos are shot) or "any" (a plain backdrop of
    # any RGB colour, as when a seller photographs the product elsewhere)
    view_backdrop: str = "light"
    # the joint pass's photo augmented as the image-only view's is (independently drawn): the joint vector
    # itself, not only the photo-alone one, learns to ignore a new framing and backdrop
    view_augment_joint: bool = False
    # dropout off by default: the objectives' masking already regularises, and short CPU runs learn faster
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    # `model_version` of the weights saved with this config (set by save_model_dir)
    model_version: str | None = None

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels

    def check(self) -> None:
        """Fail early, naming the field and the fix, on a config that cannot build a model."""
        missing = [name for name in _FROM_TOKENIZER if getattr(self, name, None) is None]
        if missing:
            raise ValueError(
                f"ItemConfig has no {', '.join(missing)}: these must come from the tokenizer. "
                "Build the config with preset_config(name, tokenizer=...)."
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.patch_stem not in PATCH_STEMS:
            raise ValueError(f"patch_stem {self.patch_stem!r} is not one of {PATCH_STEMS}")
        if self.patch_stem != "linear" and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"patch_stem={self.patch_stem!r} needs a power-of-two patch_size, not {self.patch_size}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
        if self.modalities not in MODALITIES:
            raise ValueError(f"modalities {self.modalities!r} is not one of {MODALITIES}")
        # an objective needs the inputs it predicts from: name the switch to turn off
        needs = {"itm": "image+title", "mlm": "title", "global_mlm": "title", "mim": "image", "global_mim": "image"}
        for name, modality in needs.items():
            if getattr(self, f"use_{name}") and modality not in self.modalities:
                raise ValueError(f"use_{name}=True needs the {modality} input but modalities={self.modalities!r}")
        if self.architecture == "two_stream" and (self.modalities != "image+title" or not self.use_contrastive):
            raise ValueError("architecture='two_stream' needs modalities='image+title' and use_contrastive=True")
        if self.pooling not in POOLINGS or self.view_pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} / view_pooling {self.view_pooling!r}: each is one of {POOLINGS}")
        if self.view_backdrop not in BACKDROPS:
            raise ValueError(f"view_backdrop {self.view_backdrop!r} is not one of {BACKDROPS}")
        if self.use_view_contrastive and (self.architecture != "single_stream" or self.modalities != "image+title"):
            raise ValueError("use_view_contrastive needs the single-stream model over image+title")
        if self.max_title_len < 2:
            raise ValueError("max_title_len must leave room for [CLS] and [SEP] (>= 2)")


def preset_config(name: str, tokenizer, variant: str = "item", **overrides) -> ItemConfig:
    """The config of preset `name` and model `variant`, with vocab size and special token ids read from
    `tokenizer`. `overrides` replace any field (objective switches, weights, sizes)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "mask_token_id": tokenizer.mask_token_id,
    }
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"tokenizer lacks {missing}: it needs [PAD], [CLS], [SEP] and [MASK] tokens")
    config = ItemConfig(**{**PRESETS[name], **VARIANTS[variant], **ids, **overrides})
    config.check()
    return config
