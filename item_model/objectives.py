"""The five ITEm pretraining objectives as small pure functions: masking, then one loss each.

Each loss takes predictions and targets and returns a scalar; the model decides which heads feed them.
ITM, MLM and MIM are the local objectives (ViLT-style); global MLM and global MIM reuse the MLM/MIM
losses on predictions made from the [CLS] state plus the slot's position only (see modeling.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100  # label of a token that is not predicted


def mask_tokens(
    input_ids: torch.Tensor,  # [B, T]
    maskable: torch.Tensor,  # [B, T] bool: real title words (not [CLS]/[SEP]/[PAD])
    probability: float,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `probability` of the maskable tokens; of those 80% -> [MASK], 10% -> random,
    10% unchanged. Returns (masked input_ids, labels with IGNORE where not picked)."""
    rand = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    picked = (rand < probability) & maskable
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, IGNORE))
    action = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    masked = torch.where(picked & (action < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(picked & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, labels


def mask_patches(
    batch_size: int,
    num_patches: int,
    probability: float,
    has_image: torch.Tensor,  # [B] bool
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Exactly round(probability * N) random patches per image row (MAE-style shuffle); [B, N] bool."""
    n_mask = int(round(probability * num_patches))
    noise = torch.rand(batch_size, num_patches, generator=generator, device=has_image.device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # each patch's rank in a random permutation
    return (ranks < n_mask) & has_image[:, None]


def swap_images(has_image: torch.Tensor, has_title: torch.Tensor, probability: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose rows whose image is replaced by another row's (ITM negatives).

    Only rows with both modalities take part. Returns (source row index per row [B], swapped [B] bool);
    a swapped row takes the image of the next eligible row, which is another product's.
    """
    eligible = has_image & has_title
    idx = torch.arange(has_image.shape[0], device=has_image.device)
    swapped = eligible & (torch.rand(has_image.shape, generator=generator, device=has_image.device) < probability)
    candidates = idx[eligible]
    source = idx.clone()
    if candidates.numel() >= 2:
        # rotate the eligible rows by one: row i gets the image of the next eligible row
        rolled = candidates.roll(-1)
        source[candidates] = torch.where(swapped[candidates], rolled, candidates)
    else:
        swapped = torch.zeros_like(swapped)
    return source, swapped


def itm_loss(logits: torch.Tensor, swapped: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Image-text matching: 2-way cross-entropy on [CLS]; class 1 = the image belongs to the title."""
    if not valid.any():
        return logits.sum() * 0.0
    target = (~swapped).long()
    return F.cross_entropy(logits[valid], target[valid])


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the vocabulary. logits [M, V] at the M picked slots, targets [M] word ids."""
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets)


def patch_targets(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's normalised-pixel targets: each patch standardised by its own mean and variance."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def mim_loss(pred: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Mean squared error against normalised pixels (MAE). pred, patches [M, P*P*C] at the M masked patches."""
    if patches.numel() == 0:
        return pred.sum() * 0.0
    return ((pred.float() - patch_targets(patches.float())) ** 2).mean()


# --- view consistency (ours, not the paper's): two views of one listing embed close ------------------


def info_nce(anchors: torch.Tensor, views: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric in-batch InfoNCE (CLIP's loss): row i of `anchors` [M, D] must pick row i of `views`
    [M, D] among all M, and the reverse. Both L2-normalised."""
    logits = anchors @ views.T / temperature  # [M, M]
    target = torch.arange(len(anchors), device=anchors.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def drop_tokens(
    input_ids: torch.Tensor,  # [B, T]
    attention_mask: torch.Tensor,  # [B, T]
    probability: float,
    keep_ids: tuple[int, ...],  # never dropped ([CLS], [SEP])
    pad_token_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A title view: each word token is dropped (unattended, set to [PAD]) with `probability`."""
    rand = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    special = torch.isin(input_ids, torch.tensor(keep_ids, device=input_ids.device))
    drop = (rand < probability) & attention_mask.bool() & ~special
    return input_ids.masked_fill(drop, pad_token_id), attention_mask.masked_fill(drop, 0)


def augment_images(
    pixel_values: torch.Tensor,  # [B, S, S, 3] uint8
    crop_scale_min: float,
    generator: torch.Generator | None = None,
    zoom_out_max: float = 0.0,
    rotation_max_deg: float = 0.0,
    backdrop: str = "light",
) -> torch.Tensor:
    """A photo view for training, in batch on the device: a random re-framing (a resized crop keeping an
    area share in [crop_scale_min, 1] or, with `zoom_out_max`, a zoom-out to as little as 1 - zoom_out_max
    of the side on a plain backdrop, light grey to white or, with backdrop="any", of any RGB colour; aspect
    3/4..4/3; a rotation up to `rotation_max_deg`; the subject anywhere in the frame), a horizontal flip,
    and brightness and contrast x U(0.8, 1.2). Returns float [B, S, S, 3] in 0..255 (the model's patchify
    takes either).

    Generic augmentations (SimCLR's crop, flip and colour jitter; torchvision's RandomAffine), drawn in
    torch: deliberately not the evaluation's re-listing generator (pipeline/perturb.py: PIL, its own
    padding, rotation and crop ranges, title edits, JPEG re-encoding, which training never applies), so
    that re-listing recall measures what a model learned, not the test's own perturbations. One family is
    alike in kind: the generator's `background` also puts the photo on a plain backdrop of a random colour
    (padding of up to 15% per side); docs/evaluation.md (run 5) reads the figures with that in mind.
    """
    b, s, _, _ = pixel_values.shape
    device = pixel_values.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator, device=device)

    # side of the sampled window relative to the image: < 1 crops in, > 1 zooms out (background shows)
    area = uniform(crop_scale_min, 1.0 / (1.0 - zoom_out_max) ** 2)
    log_ratio = uniform(math.log(3 / 4), math.log(4 / 3))
    sx, sy = (area * log_ratio.exp()).sqrt(), (area / log_ratio.exp()).sqrt()
    tx, ty = (1 - sx).abs() * uniform(-1.0, 1.0), (1 - sy).abs() * uniform(-1.0, 1.0)  # window position
    angle = uniform(-1.0, 1.0) * math.radians(rotation_max_deg)
    flip = torch.where(torch.rand(b, generator=generator, device=device) < 0.5, -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([sx * cos * flip, -sy * sin, tx], dim=1),
                         torch.stack([sx * sin * flip, sy * cos, ty], dim=1)], dim=1)  # [B, 2, 3]
    x = pixel_values.permute(0, 3, 1, 2).float()  # [B, 3, S, S]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(torch.ones_like(x[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)  # [B, 1, S, S]: 1 where the photo is, 0 on the background
    if backdrop == "light":  # catalog photos are mostly shot on light backgrounds
        background = uniform(200.0, 255.0)[:, None, None, None]
    else:  # "any": a new backdrop of any colour, as when a seller photographs the product elsewhere
        background = 255.0 * torch.rand(b, 3, 1, 1, generator=generator, device=device)
    x = x + (1 - inside) * background
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(0.8, 1.2)[:, None, None, None] + mean  # contrast
    x = x * uniform(0.8, 1.2)[:, None, None, None]  # brightness
    return x.clamp(0, 255).permute(0, 2, 3, 1)  # [B, S, S, 3]
