"""The ITEm model: single-stream BERT over title tokens and raw image patches, read top to bottom.

    [CLS] title tokens [SEP] | patch_1 ... patch_N      (one sequence, one shared BERT encoder)

Embeddings, then the encoder (transformers' own BERT layers, so a BERT checkpoint can initialise them),
then the model with its one public embedding call `encode`, then the pretraining heads and the
forward pass that returns named losses. Liao et al., "ITEm: Unsupervised Image-Text Embedding
Learning for eCommerce", arXiv 2311.02084.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertEncoder
from transformers.utils import logging as hf_logging

from . import objectives
from .config import ItemConfig

TEXT, IMAGE = 0, 1  # modality types


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """uint8 [B, S, S, C] -> normalised float patches [B, N, P*P*C], row-major over the patch grid."""
    b, s, _, c = pixel_values.shape
    g = s // patch_size
    x = pixel_values.float().div(127.5).sub(1.0)  # [B, S, S, C] in [-1, 1]
    x = x.reshape(b, g, patch_size, g, patch_size, c)  # [B, g, P, g, P, C]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [B, g, g, P, P, C]
    return x.reshape(b, g * g, patch_size * patch_size * c)  # [B, N, P*P*C]


def empty_titles(config: ItemConfig, like: torch.Tensor, t: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, t] of rows with no title: [CLS] [SEP] [PAD]..., exactly what the
    processor makes of an empty title, so a row trained without its title is embedded the same way."""
    t = like.shape[1] if t is None else t
    ids = torch.full((t,), config.pad_token_id, dtype=like.dtype, device=like.device)
    ids[0], ids[1] = config.cls_token_id, config.sep_token_id
    mask = (torch.arange(t, device=like.device) < 2).to(like.dtype)
    return ids.expand(like.shape[0], t), mask.expand(like.shape[0], t)


def restrict_modalities(
    config: ItemConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor, has_image: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hide the input a single-modality model must not see: the title becomes [CLS] [SEP], or the image
    is marked absent. A no-op for the joint model."""
    if config.modalities == "title":
        has_image = torch.zeros_like(has_image)
    elif config.modalities == "image":
        input_ids, attention_mask = empty_titles(config, input_ids)
    return input_ids, attention_mask, has_image


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the title columns that are padding in every row of the batch (titles are padded to
    max_title_len; most are half that): less work, the same result, since pads are never attended."""
    t = max(2, int(attention_mask.sum(dim=1).max()))
    return input_ids[:, :t], attention_mask[:, :t]


def check_whiten_shrink(whiten_shrink: float | None) -> None:
    """The partial whitening's eps must be > 0; None means centring only."""
    if whiten_shrink is not None and not whiten_shrink > 0:
        raise ValueError(f"whiten_shrink must be > 0 (or None: centring only), got {whiten_shrink}")


class ConvPatchStem(nn.Module):
    """A small convolutional net applied to each patch on its own (Xiao et al. 2021, "Early convolutions
    help transformers see better"): log2(P) 3x3 convolutions of stride 2 take a P x P patch to one
    position, channels doubling to the hidden size, then a linear map. Patches stay independent, so a
    patch masked for MIM leaks nothing into its neighbours' tokens. [B, N, P*P*C] -> [B, N, D].

    With `whole_image` (patch_stem="conv_image") the same convolutions run over the whole photo, as in
    Xiao et al.: a token's receptive field (2P - 1 px) reaches into its neighbours, so a shifted or
    re-framed photo changes its tokens less; `ItemEmbeddings` then blanks masked patches before the stem."""

    def __init__(self, config: ItemConfig) -> None:
        super().__init__()
        h, p, c = config.hidden_size, config.patch_size, config.num_channels
        depth = p.bit_length() - 1  # P is a power of two (ItemConfig.check)
        widths = [c] + [max(8, h >> (depth - 1 - i)) for i in range(depth)]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(w_in, w_out, kernel_size=3, stride=2, padding=1), nn.GELU()]
        self.convs = nn.Sequential(*layers)
        self.projection = nn.Linear(widths[-1], h)
        self.patch_size, self.num_channels = p, c
        self.whole_image = config.patch_stem == "conv_image"

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, n, _ = patches.shape
        p, c = self.patch_size, self.num_channels
        if not self.whole_image:
            x = patches.reshape(b * n, p, p, c).permute(0, 3, 1, 2)  # patchify's (P, P, C) order -> [B*N, C, P, P]
            return self.projection(self.convs(x).reshape(b, n, -1))  # [B*N, W, 1, 1] -> [B, N, D]
        g = math.isqrt(n)  # patchify's row-major g x g grid, undone: [B, C, g*P, g*P]
        x = patches.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)
        x = self.convs(x)  # [B, W, g, g]: one position per patch
        return self.projection(x.flatten(2).transpose(1, 2))  # [B, N, D]


class ItemEmbeddings(nn.Module):
    """Token and patch embeddings, each with a position and a modality-type embedding."""

    def __init__(self, config: ItemConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.patch_size = config.patch_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        self.text_position_embeddings = nn.Embedding(config.max_title_len, h)
        # ViT's linear projection of raw patches, or a convolutional stem per patch or over the photo (config.patch_stem)
        self.patch_projection = nn.Linear(config.patch_dim, h) if config.patch_stem == "linear" else ConvPatchStem(config)
        self.stem_sees_neighbours = config.patch_stem == "conv_image"
        self.image_position_embeddings = nn.Embedding(config.num_patches, h)
        self.mask_patch = nn.Parameter(torch.zeros(h))  # replaces a masked patch's projection (MIM)
        self.modality_type_embeddings = nn.Embedding(2, h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)  # BERT's name: checkpoints load into it
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> word + position + modality type 0, [B, T, D] (before LayerNorm)."""
        t = input_ids.shape[1]
        text = self.word_embeddings(input_ids)  # [B, T, D]
        text = text + self.text_position_embeddings(torch.arange(t, device=input_ids.device))[None]
        return text + self.modality_type_embeddings.weight[TEXT]

    def embed_image(self, patches: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised patches [B, N, P*P*C] -> projection + position + modality type 1, [B, N, D].

        Masked patches (MIM) are replaced by the learned [MASK] patch before the position is added.
        """
        n = patches.shape[1]
        if patch_mask is not None and self.stem_sees_neighbours:  # a masked patch's pixels must not reach its neighbours
            patches = patches.masked_fill(patch_mask[..., None], 0.0)
        image = self.patch_projection(patches)  # [B, N, D]
        if patch_mask is not None:
            image = torch.where(patch_mask[..., None], self.mask_patch.to(image.dtype), image)
        image = image + self.image_position_embeddings(torch.arange(n, device=patches.device))[None]
        return image + self.modality_type_embeddings.weight[IMAGE]

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        patches: torch.Tensor | None,  # [B, N, P*P*C] normalised pixels; None = a title-only stream
        patch_mask: torch.Tensor | None = None,  # [B, N] bool: patches hidden from the encoder (MIM)
    ) -> torch.Tensor:
        # text embeddings (modality type 0) and patch embeddings (modality type 1), then
        # concatenate into one stream: [CLS] title [SEP] patches
        stream = self.embed_text(input_ids)  # [B, T, D]
        if patches is not None:
            stream = torch.cat([stream, self.embed_image(patches, patch_mask)], dim=1)  # [B, T+N, D]
        return self.dropout(self.LayerNorm(stream))


class GlobalHead(nn.Module):
    """Predicts a masked slot from the [CLS] state and that slot's position embedding only.

    This bottleneck is the paper's point: the slot's own hidden state is never an input, so the only
    way to reconstruct a masked word or patch is to have put the information into [CLS].
    """

    def __init__(self, config: ItemConfig, out_dim: int) -> None:
        super().__init__()
        h = config.hidden_size
        self.transform = nn.Sequential(nn.Linear(2 * h, h), nn.GELU(), nn.LayerNorm(h, eps=config.layer_norm_eps))
        self.decoder = nn.Linear(h, out_dim)

    def forward(self, cls_state: torch.Tensor, slot_position: torch.Tensor) -> torch.Tensor:
        # cls_state [M, D]: the [CLS] state of each masked slot's row; slot_position [M, D]
        return self.decoder(self.transform(torch.cat([cls_state, slot_position], dim=-1)))  # [M, out_dim]


class ItemPretrainingHeads(nn.Module):
    """The heads of the five objectives. Local heads read each slot's state; global ones only [CLS]."""

    def __init__(self, config: ItemConfig) -> None:
        super().__init__()
        h = config.hidden_size

        def slot_head(out_dim: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=config.layer_norm_eps), nn.Linear(h, out_dim))

        self.itm = nn.Linear(h, 2)
        self.mlm = slot_head(config.vocab_size)
        self.mim = slot_head(config.patch_dim)
        self.global_mlm = GlobalHead(config, config.vocab_size)
        self.global_mim = GlobalHead(config, config.patch_dim)


class ItemModel(PreTrainedModel):
    """ITEm: `encode` gives the product embedding; `forward` gives the pretraining losses."""

    config_class = ItemConfig
    base_model_prefix = "item"
    # the parameters init_from_bert fills from a BERT checkpoint; everything else starts random
    BERT_PARAMETERS = ("embeddings.word_embeddings.", "embeddings.text_position_embeddings.",
                       "embeddings.modality_type_embeddings.", "embeddings.LayerNorm.", "encoder.")
    main_input_name = "input_ids"
    _supports_sdpa = True
    # a model dir saved before the whitening existed has none: it loads with the identity, no warning
    _keys_to_ignore_on_load_missing = [r"^embedding_whitening$"]

    def __init__(self, config: ItemConfig) -> None:
        config.check()
        super().__init__(config)
        self.embeddings = ItemEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.heads = ItemPretrainingHeads(config)
        # the corpus mean of the published vectors, subtracted inside `encode`, and a linear map applied to
        # what is left (zeros and the identity: nothing changes). Fitted on the training catalog at the end of
        # pretraining (fit_embedding_space) and saved with the weights, so every consumer of the model dir gets
        # the same vectors. Without the centre, a briefly trained encoder's vectors share one dominant
        # direction and every pair looks alike; the (partial) whitening damps the few directions that still
        # dominate what is left. A model dir saved before the whitening existed loads with the identity.
        self.register_buffer("embedding_center", torch.zeros(config.hidden_size))
        self.register_buffer("embedding_whitening", torch.eye(config.hidden_size))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.Conv2d):  # He init: BERT's std 0.02 would shrink the stem's signal to nothing
            init.kaiming_normal_(module.weight, nonlinearity="relu")
            init.zeros_(module.bias)
        if isinstance(module, ItemEmbeddings):  # (visited after its children: this overrides their init)
            init.normal_(module.mask_patch, std=self.config.initializer_range)
            stem = module.patch_projection
            if isinstance(stem, ConvPatchStem):  # tokens on the scale of the linear stem's, not std 0.02 x that
                init.normal_(stem.projection.weight, std=stem.projection.in_features ** -0.5)
        if isinstance(module, ItemModel):
            init.zeros_(module.embedding_center)
            init.eye_(module.embedding_whitening)

    @property
    def embedding_dim(self) -> int:
        return self.config.hidden_size

    @torch.no_grad()
    def init_from_bert(self, bert_dir: str) -> None:
        """Initialise the text stream and the encoder from a local HF BERT checkpoint (never downloaded).

        Copies word embeddings, the first `max_title_len` position embeddings (into the text positions),
        the two token-type embeddings (into the modality types: BERT's segment A is our text), the
        embedding LayerNorm and every encoder layer. The image stream and the heads keep their random
        init. The architecture must match the checkpoint; a mismatch fails naming each field.
        """
        from transformers import BertModel  # local import: only this path needs it

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report lists the pooler we leave out: noise, not news
        try:
            bert = BertModel.from_pretrained(bert_dir, local_files_only=True, add_pooling_layer=False,
                                             use_safetensors=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        b, c = bert.config, self.config
        fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        bad = [f"{f}: preset {getattr(c, f)} vs {bert_dir} {getattr(b, f)}" for f in fields if getattr(c, f) != getattr(b, f)]
        if b.max_position_embeddings < c.max_title_len:
            bad.append(f"max_title_len {c.max_title_len} > the checkpoint's {b.max_position_embeddings} positions")
        if bad:
            raise ValueError(
                f"cannot initialise from BERT checkpoint {bert_dir}: {'; '.join(bad)}. "
                "Choose the preset whose shape matches the checkpoint (e.g. base for bert-base-uncased)."
            )
        src, dst = bert.embeddings, self.embeddings
        dst.word_embeddings.weight.copy_(src.word_embeddings.weight)
        dst.text_position_embeddings.weight.copy_(src.position_embeddings.weight[: c.max_title_len])
        n_types = min(2, src.token_type_embeddings.weight.shape[0])
        dst.modality_type_embeddings.weight[:n_types].copy_(src.token_type_embeddings.weight[:n_types])
        dst.LayerNorm.load_state_dict(src.LayerNorm.state_dict())
        # same transformers BertEncoder class on both sides: the keys match one to one
        self.encoder.load_state_dict(bert.encoder.state_dict())

    # --- phase 1: the encoder --------------------------------------------------------------------

    def forward_encoder(
        self,
        input_ids: torch.Tensor,  # [B, T] int64
        attention_mask: torch.Tensor,  # [B, T] 1 = real token
        pixel_values: torch.Tensor | None,  # [B, S, S, 3] uint8 (or float 0..255); None = title-only stream
        has_image: torch.Tensor,  # [B] bool; False = no image, its patches are not attended to
        patch_mask: torch.Tensor | None = None,  # [B, N] bool, MIM only
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (final hidden states [B, L, D], the stream's attention mask [B, L] with L = T+N
        (L = T without pixels), the normalised patches [B, N, P*P*C] or None)."""
        input_ids, attention_mask, has_image = restrict_modalities(self.config, input_ids, attention_mask, has_image)
        patches = None if pixel_values is None else patchify(pixel_values, self.config.patch_size)  # [B, N, P*P*C]
        embeddings = self.embeddings(input_ids, None if patches is None else patches.to(self.dtype), patch_mask)
        mask = attention_mask  # [B, T]
        if patches is not None:
            image_attention = has_image[:, None].expand(-1, patches.shape[1]).to(attention_mask.dtype)  # [B, N]
            mask = torch.cat([attention_mask, image_attention], dim=1)  # [B, T+N]
        attention = create_bidirectional_mask(config=self.config, inputs_embeds=embeddings, attention_mask=mask)
        hidden = self.encoder(embeddings, attention_mask=attention).last_hidden_state  # [B, L, D]
        return hidden, mask, patches

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor, pooling: str | None = None) -> torch.Tensor:
        """The row's vector before normalisation, [B, D]: the [CLS] state, or the mean of the attended
        states (`pooling`, by default config.pooling: the published vector's)."""
        if (pooling or self.config.pooling) == "cls":
            return hidden[:, 0]
        weights = mask.to(hidden.dtype)[..., None]  # [B, L, 1]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    # --- the public embedding call ---------------------------------------------------------------

    @torch.no_grad()
    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        has_image: torch.Tensor,
    ) -> torch.Tensor:
        """The product embedding, [B, D] float32: the pooled final state (config.pooling), L2-normalised,
        minus the corpus mean fitted in pretraining (embedding_center), times its whitening
        (embedding_whitening), L2-normalised again.

        A row may lack a modality: `has_image=False`, or a title of just [CLS] [SEP].
        """
        input_ids, attention_mask = trim_padding(input_ids, attention_mask)
        hidden, mask, _ = self.forward_encoder(input_ids, attention_mask, pixel_values, has_image)
        with torch.autocast(hidden.device.type, enabled=False):  # the centring and whitening in fp32 under autocast
            vectors = F.normalize(self.pool(hidden.float(), mask), dim=-1)
            return F.normalize((vectors - self.embedding_center.float()) @ self.embedding_whitening.float(), dim=-1)

    @torch.no_grad()
    def reset_embedding_space(self) -> None:
        """No centre, no whitening: `encode` gives the normalised pooled state."""
        self.embedding_center.zero_()
        self.embedding_whitening.copy_(torch.eye(self.config.hidden_size))

    @torch.no_grad()
    def fit_embedding_space(self, batches: Iterable[dict[str, torch.Tensor]], whiten_shrink: float | None = None) -> int:
        """Fit the embedding space (set_embedding_space) to the raw vectors of `batches` (model inputs, e.g. a
        sample of the training catalog). Returns the number of rows it was fitted on."""
        check_whiten_shrink(whiten_shrink)  # before the encoding pass
        self.reset_embedding_space()
        vectors = [self.encode(**batch).double() for batch in batches]  # [B, D] raw (normalised) vectors
        if not vectors:
            raise ValueError("fit_embedding_space got no rows")
        self.set_embedding_space(torch.cat(vectors), whiten_shrink)
        return sum(len(v) for v in vectors)

    @torch.no_grad()
    def set_embedding_space(self, raw: torch.Tensor, whiten_shrink: float | None = None) -> None:
        """embedding_center := the mean of `raw` ([R, D] raw vectors, as encode gives them after
        reset_embedding_space) and, with `whiten_shrink` (eps > 0), embedding_whitening := a partial PCA
        whitening of them (BERT-whitening, Su et al. 2021, damped): every principal direction scaled by
        1/sqrt(variance + eps x the mean variance), so the dominant directions shrink and the faint ones are
        not blown up. None: the identity (centring only)."""
        check_whiten_shrink(whiten_shrink)
        self.reset_embedding_space()
        raw = raw.double()
        mean = raw.mean(dim=0)
        self.embedding_center.copy_(mean)
        if whiten_shrink is not None:
            centred = raw - mean
            variances, directions = torch.linalg.eigh(centred.T @ centred / len(raw))  # ascending, [D], [D, D]
            variances = variances.clamp_min(0.0)
            scale = 1.0 / torch.sqrt(variances + whiten_shrink * variances.mean())
            # rotated back (ZCA): the vectors keep their axes; the cosines are those of the PCA form
            self.embedding_whitening.copy_(directions * scale @ directions.T)

    # --- phase 2: pretraining losses -------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        has_image: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One pretraining step's losses: {"itm", "mlm", "mim", "global_mlm", "global_mim", "view", "loss"}.

        One encoder pass serves all five objectives: titles are masked, patches are masked, and a share of
        rows get another row's image (ITM negatives). MLM/MIM and their global variants are scored on
        rows whose image was not swapped, so a mismatched pair never teaches reconstruction.
        The view-consistency term (ours) adds an image-only and a title-only pass (see forward_views).
        Disabled objectives are absent from the dict and cost nothing.
        """
        c = self.config
        input_ids, attention_mask = trim_padding(input_ids, attention_mask)
        b, t = input_ids.shape
        device = input_ids.device
        input_ids, attention_mask, has_image = restrict_modalities(c, input_ids, attention_mask, has_image)
        has_title = attention_mask.sum(dim=1) > 2  # more than [CLS] [SEP]
        original = (input_ids, attention_mask, pixel_values, has_image, has_title)  # for the view passes
        if self.training and c.use_view_contrastive and c.view_augment_joint:  # a new photo in the joint pass too
            pixel_values = objectives.augment_images(pixel_values, c.view_crop_scale_min, generator,
                                                     c.view_zoom_out_max, c.view_rotation_max_deg, c.view_backdrop)

        # modality dropout: some rows lose their title or their image, as rows in the catalog do. A row
        # without its title becomes [CLS] [SEP], exactly the input of an empty title at inference.
        if self.training and c.modality_dropout > 0:
            drop = torch.rand(b, generator=generator, device=device) < c.modality_dropout
            drop_image = drop & (torch.rand(b, generator=generator, device=device) < 0.5) & has_title
            drop_title = drop & ~drop_image & has_image
            has_image = has_image & ~drop_image
            empty_ids, empty_mask = empty_titles(c, input_ids)
            input_ids = torch.where(drop_title[:, None], empty_ids, input_ids)
            attention_mask = torch.where(drop_title[:, None], empty_mask, attention_mask)
            has_title = has_title & ~drop_title

        # ITM negatives: swap images between rows
        swapped = torch.zeros(b, dtype=torch.bool, device=device)
        if c.use_itm:
            source, swapped = objectives.swap_images(has_image, has_title, c.itm_swap_probability, generator)
            pixel_values, has_image = pixel_values[source], has_image[source]

        # masking: title tokens for (global) MLM, patches for (global) MIM. Swapped rows are masked like
        # every other row but not scored: were they left unmasked, "nothing is masked" would give the ITM
        # answer away (ITM loss ~0 within a few dozen steps), and a mismatched pair must not teach
        # reconstruction.
        words = (attention_mask.bool() & (input_ids != c.cls_token_id) & (input_ids != c.sep_token_id)
                 & (input_ids != c.pad_token_id))
        labels = torch.full_like(input_ids, objectives.IGNORE)
        if c.use_mlm or c.use_global_mlm:
            input_ids, labels = objectives.mask_tokens(
                input_ids, words, c.mlm_probability, c.mask_token_id, c.vocab_size, generator)
            labels = labels.masked_fill(swapped[:, None], objectives.IGNORE)
        patch_mask = scored_patches = None
        if c.use_mim or c.use_global_mim:
            patch_mask = objectives.mask_patches(b, c.num_patches, c.mim_probability, has_image, generator)
            scored_patches = patch_mask & ~swapped[:, None]

        hidden, mask, patches = self.forward_encoder(input_ids, attention_mask, pixel_values, has_image, patch_mask)
        losses = self.forward_losses(hidden, patches, labels, scored_patches, swapped, has_image & has_title)
        if c.use_view_contrastive:
            joint = self.pool(hidden, mask, c.view_pooling)
            terms = self.forward_views(joint, ~swapped, *original, generator)
            cross = terms.pop("view_cross", None)
            losses["view"] = torch.stack(list(terms.values())).mean() if terms else joint.sum() * 0.0
            losses["loss"] = losses["loss"] + c.view_contrastive_weight * losses["view"]
            if cross is not None:
                losses["view_cross"] = cross
                losses["loss"] = losses["loss"] + c.view_cross_weight * cross
            for name in ("view_image", "view_title"):  # reported (0 where a batch had no pair for it), not optimised again
                losses[name] = terms[name].detach() if name in terms else torch.zeros_like(losses["view"]).detach()
        return losses

    def forward_views(
        self,
        joint: torch.Tensor,  # [B, D] the (masked) joint pass pooled by config.view_pooling: the anchors
        anchor_ok: torch.Tensor,  # [B] bool: anchors that show the row's own product (not ITM-swapped)
        input_ids: torch.Tensor,  # [B, T] the row's unmasked title
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,  # [B, S, S, 3] the row's own image
        has_image: torch.Tensor,
        has_title: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """View consistency: in-batch InfoNCE of each anchor against an image-only view of its row (a
        randomly re-framed, rotated, flipped, colour-jittered photo) and a title-only view (words dropped).
        Returns {"view_image", "view_title"}, each where the batch has two rows or more for it, and with
        config.view_cross_weight "view_cross": the image-only view against the title-only view of the rows
        that have both (symmetric InfoNCE).

        The image-only pass is [CLS] [SEP] + patches and the title-only pass has no patches, as the
        processor makes such rows at inference, so they cost 2+N and T positions, not T+N each.
        """
        c = self.config
        anchors = F.normalize(joint.float(), dim=-1)
        terms = {}
        image_rows = anchor_ok & has_image
        if image_rows.sum() >= 2:
            ids, mask = empty_titles(c, input_ids, t=2)
            pixels = objectives.augment_images(pixel_values[image_rows], c.view_crop_scale_min, generator,
                                               c.view_zoom_out_max, c.view_rotation_max_deg, c.view_backdrop)
            hidden, stream_mask, _ = self.forward_encoder(ids[image_rows], mask[image_rows], pixels,
                                                          has_image[image_rows])
            image_views = F.normalize(self.pool(hidden, stream_mask, c.view_pooling).float(), dim=-1)
            terms["view_image"] = objectives.info_nce(anchors[image_rows], image_views, c.contrastive_temperature)
        title_rows = anchor_ok & has_title
        if title_rows.sum() >= 2:
            ids, mask = objectives.drop_tokens(input_ids[title_rows], attention_mask[title_rows], c.view_token_drop,
                                               (c.cls_token_id, c.sep_token_id), c.pad_token_id, generator)
            hidden, stream_mask, _ = self.forward_encoder(ids, mask, None, torch.zeros_like(has_image[title_rows]))
            title_views = F.normalize(self.pool(hidden, stream_mask, c.view_pooling).float(), dim=-1)
            terms["view_title"] = objectives.info_nce(anchors[title_rows], title_views, c.contrastive_temperature)
        both = image_rows & title_rows
        if c.view_cross_weight > 0 and both.sum() >= 2:
            photos, titles = image_views[both[image_rows]], title_views[both[title_rows]]
            terms["view_cross"] = (objectives.info_nce(photos, titles, c.contrastive_temperature)
                                   + objectives.info_nce(titles, photos, c.contrastive_temperature)) / 2
        return terms

    def forward_losses(
        self,
        hidden: torch.Tensor,  # [B, T+N, D]
        patches: torch.Tensor | None,  # [B, N, P*P*C] the unmasked pixels: MIM targets
        labels: torch.Tensor,  # [B, T] word ids to predict, IGNORE elsewhere
        patch_mask: torch.Tensor | None,  # [B, N] bool masked patches (None: MIM off)
        swapped: torch.Tensor,  # [B] bool, ITM negatives
        itm_valid: torch.Tensor,  # [B] bool, rows with both modalities
    ) -> dict[str, torch.Tensor]:
        """The heads and their losses, computed at masked slots only (never over every position).

        Local heads read the masked slot's own final state; global heads read the [CLS] state of the
        slot's row and the slot's position embedding, nothing else.
        """
        c, heads, emb = self.config, self.heads, self.embeddings
        t = labels.shape[1]
        cls_state = hidden[:, 0]  # [B, D]
        losses: dict[str, torch.Tensor] = {}
        if c.use_itm:
            losses["itm"] = objectives.itm_loss(heads.itm(cls_state), swapped, itm_valid)
        rows, cols = (labels != objectives.IGNORE).nonzero(as_tuple=True)  # M masked words
        words = labels[rows, cols]  # [M]
        if c.use_mlm:
            losses["mlm"] = objectives.mlm_loss(heads.mlm(hidden[rows, cols]), words)
        if c.use_global_mlm:
            slot = emb.text_position_embeddings.weight[cols]  # [M, D]
            losses["global_mlm"] = objectives.mlm_loss(heads.global_mlm(cls_state[rows], slot), words)
        if patch_mask is not None:
            rows, cols = patch_mask.nonzero(as_tuple=True)  # M masked patches
            targets = patches[rows, cols]  # [M, P*P*C]
            if c.use_mim:
                losses["mim"] = objectives.mim_loss(heads.mim(hidden[rows, t + cols]), targets)
            if c.use_global_mim:
                slot = emb.image_position_embeddings.weight[cols]  # [M, D]
                losses["global_mim"] = objectives.mim_loss(heads.global_mim(cls_state[rows], slot), targets)
        if not losses and not c.use_view_contrastive:
            raise ValueError("every objective is switched off: enable at least one use_* in the config")
        losses["loss"] = sum((getattr(c, f"{name}_weight") * value for name, value in losses.items()),
                             hidden.new_zeros((), dtype=torch.float32))
        return losses
