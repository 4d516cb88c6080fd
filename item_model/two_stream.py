"""The two-stream baseline: separate title and image encoders trained contrastively (CLIP-style).

EVALUATION.md compares ITEm against it. Same embeddings module and BERT layers as ITEm, but the two
modalities never attend to each other: each stream has half of ITEm's layers (similar parameter count),
its own [CLS], and the product embedding is the concatenation of both normalised [CLS] projections.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertEncoder

from .config import ItemConfig
from .modeling import ItemEmbeddings, patchify


class TwoStreamModel(PreTrainedModel):
    """`encode` -> [B, 2D]: [title half | image half], a missing modality's half is zero."""

    config_class = ItemConfig
    base_model_prefix = "two_stream"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: ItemConfig) -> None:
        config.check()
        super().__init__(config)
        h = config.hidden_size
        stream = copy.deepcopy(self.config)  # after super().__init__: carries the attention implementation
        stream.num_hidden_layers = max(1, math.ceil(config.num_hidden_layers / 2))
        self.embeddings = ItemEmbeddings(config)
        self.image_cls = nn.Parameter(torch.zeros(h))  # the image stream's own [CLS]
        self.image_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.text_encoder = BertEncoder(stream)
        self.image_encoder = BertEncoder(stream)
        self.text_projection = nn.Linear(h, h)
        self.image_projection = nn.Linear(h, h)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TwoStreamModel):
            init.normal_(module.image_cls, std=self.config.initializer_range)
            init.constant_(module.logit_scale, math.log(1 / 0.07))
        if isinstance(module, ItemEmbeddings):
            init.normal_(module.mask_patch, std=self.config.initializer_range)

    @property
    def embedding_dim(self) -> int:
        return 2 * self.config.hidden_size

    def _encode(self, encoder: BertEncoder, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=x, attention_mask=mask)
        return encoder(x, attention_mask=mask).last_hidden_state[:, 0]  # [B, D]

    def forward_streams(self, input_ids, attention_mask, pixel_values, has_image) -> tuple[torch.Tensor, torch.Tensor]:
        """(title vector, image vector), each [B, D] and L2-normalised."""
        emb = self.embeddings
        text = emb.dropout(emb.LayerNorm(emb.embed_text(input_ids)))  # [B, T, D]
        patches = patchify(pixel_values, self.config.patch_size).to(self.dtype)
        image = emb.embed_image(patches)  # [B, N, D]
        image = torch.cat([self.image_cls.expand(image.shape[0], 1, -1).to(image.dtype), image], dim=1)  # [B, 1+N, D]
        image = emb.dropout(self.image_norm(image))
        image_mask = torch.ones(image.shape[:2], dtype=attention_mask.dtype, device=image.device)
        title_vec = self.text_projection(self._encode(self.text_encoder, text, attention_mask))
        image_vec = self.image_projection(self._encode(self.image_encoder, image, image_mask))
        return F.normalize(title_vec.float(), dim=-1), F.normalize(image_vec.float(), dim=-1)

    @torch.no_grad()
    def encode(self, input_ids, attention_mask, pixel_values, has_image) -> torch.Tensor:
        """Concatenation of both normalised vectors (a missing modality contributes zeros), renormalised."""
        title_vec, image_vec = self.forward_streams(input_ids, attention_mask, pixel_values, has_image)
        has_title = (attention_mask.sum(dim=1) > 2)[:, None]
        joint = torch.cat([title_vec * has_title, image_vec * has_image[:, None]], dim=-1)
        return F.normalize(joint, dim=-1)

    def forward(self, input_ids, attention_mask, pixel_values, has_image, generator=None) -> dict[str, torch.Tensor]:
        """{"contrastive", "loss"}: symmetric InfoNCE over the rows that have both modalities."""
        title_vec, image_vec = self.forward_streams(input_ids, attention_mask, pixel_values, has_image)
        both = has_image & (attention_mask.sum(dim=1) > 2)
        title_vec, image_vec = title_vec[both], image_vec[both]
        if title_vec.shape[0] < 2:
            loss = self.logit_scale * 0.0
        else:
            logits = self.logit_scale.clamp(max=math.log(100)).exp() * title_vec @ image_vec.T  # [M, M]
            target = torch.arange(logits.shape[0], device=logits.device)
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return {"contrastive": loss, "loss": self.config.contrastive_weight * loss}
