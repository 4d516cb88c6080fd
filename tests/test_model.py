"""ITEm model tests: shapes, finiteness, each objective, the global bottleneck, masking ratios, save/load."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from item_model import (
    PRESETS, VARIANTS, ItemModel, ItemProcessor, build_model, load_model_dir, preset_config, read_model_version,
    save_model_dir, train_tokenizer,
)
from item_model import objectives
from item_model.modeling import patchify

OBJECTIVES = ["itm", "mlm", "mim", "global_mlm", "global_mim"]
WORDS = "red blue black white green cotton denim leather wool shirt jeans shoe mug lamp slim large small".split()


def _jpeg(rng: np.random.Generator, w: int = 48, h: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer():
    rng = np.random.default_rng(0)
    return train_tokenizer([" ".join(rng.choice(WORDS, 6)) for _ in range(200)], vocab_size=120)


def make_batch(tokenizer, preset_cfg, n: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    processor = ItemProcessor(tokenizer, preset_cfg.image_size, preset_cfg.max_title_len)
    titles = [" ".join(rng.choice(WORDS, 6)) for _ in range(n)]
    out = processor(titles, [_jpeg(rng) for _ in range(n)])
    return {k: torch.from_numpy(v) for k, v in out.items() if k != "image_error"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_shaped_forward_at_tiny_width(tokenizer, preset):
    """Every preset's sequence geometry (image size, patch size, title length) runs; width kept tiny."""
    cfg = preset_config(preset, tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    model = ItemModel(cfg)
    batch = make_batch(tokenizer, cfg, n=4)
    hidden, patches = model.forward_encoder(**batch)
    assert hidden.shape == (4, cfg.max_title_len + cfg.num_patches, 32)
    assert patches.shape == (4, cfg.num_patches, cfg.patch_size**2 * 3)
    emb = model.encode(**batch)
    assert emb.shape == (4, 32)
    assert torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))


def test_every_objective_is_finite_and_backpropagates(tokenizer):
    cfg = preset_config("tiny", tokenizer)
    model = ItemModel(cfg).train()
    losses = model(**make_batch(tokenizer, cfg, n=32), generator=torch.Generator().manual_seed(0))
    assert set(losses) == {*OBJECTIVES, "loss"}
    for name in OBJECTIVES:
        assert torch.isfinite(losses[name]) and losses[name] > 0, name
        model.zero_grad()
        losses[name].backward(retain_graph=True)
        grads = [p.grad.abs().sum() for p in model.parameters() if p.grad is not None]
        assert grads and sum(grads) > 0, f"{name} does not backpropagate"


@pytest.mark.parametrize("off", OBJECTIVES)
def test_each_objective_can_be_switched_off(tokenizer, off):
    cfg = preset_config("tiny", tokenizer, **{f"use_{off}": False})
    losses = ItemModel(cfg).train()(**make_batch(tokenizer, cfg), generator=torch.Generator().manual_seed(0))
    assert off not in losses
    assert set(losses) == {*OBJECTIVES, "loss"} - {off}
    expected = sum(v for k, v in losses.items() if k != "loss")
    torch.testing.assert_close(losses["loss"], expected)


def test_all_objectives_off_is_an_error(tokenizer):
    cfg = preset_config("tiny", tokenizer, **{f"use_{o}": False for o in OBJECTIVES})
    with pytest.raises(ValueError, match="every objective is switched off"):
        ItemModel(cfg)(**make_batch(tokenizer, cfg))


def test_global_heads_never_read_the_masked_slot_state(tokenizer):
    """Perturb every non-[CLS] final state: local losses change, global losses must not."""
    cfg = preset_config("tiny", tokenizer, modality_dropout=0.0)
    model = ItemModel(cfg).eval()
    batch = make_batch(tokenizer, cfg, n=32)

    def run(perturb: bool) -> dict[str, torch.Tensor]:
        handle = None
        if perturb:
            def hook(module, args, output):
                noisy = output.last_hidden_state.clone()
                noisy[:, 1:] += 5.0 * torch.randn_like(noisy[:, 1:])
                output.last_hidden_state = noisy
                return output
            handle = model.encoder.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return model(**batch, generator=torch.Generator().manual_seed(7))
        finally:
            if handle:
                handle.remove()

    clean, noisy = run(False), run(True)
    for name in ("global_mlm", "global_mim", "itm"):
        torch.testing.assert_close(clean[name], noisy[name], msg=f"{name} read a slot state")
    for name in ("mlm", "mim"):
        assert not torch.allclose(clean[name], noisy[name]), f"{name} should read the slot state"


def test_swapped_rows_are_masked_like_the_others_but_not_scored(tokenizer, monkeypatch):
    """ITM must not be answerable from "is anything masked": swapped rows carry [MASK] tokens and masked
    patches in the encoder input like matched rows, and only matched rows are scored by MLM/MIM."""
    cfg = preset_config("tiny", tokenizer, modality_dropout=0.0, mlm_probability=0.5)
    model = ItemModel(cfg)
    batch = make_batch(tokenizer, cfg, n=8)
    swapped = torch.tensor([True, False] * 4)
    monkeypatch.setattr(objectives, "swap_images", lambda has_image, has_title, p, g: (torch.arange(8).roll(1), swapped))
    seen = {}
    encoder, losses = model.forward_encoder, model.forward_losses
    monkeypatch.setattr(model, "forward_encoder", lambda ids, mask, pix, has, pm: seen.update(ids=ids, pm=pm) or encoder(ids, mask, pix, has, pm))
    monkeypatch.setattr(model, "forward_losses", lambda h, p, labels, pm, *a: seen.update(labels=labels, scored=pm) or losses(h, p, labels, pm, *a))
    model(**batch, generator=torch.Generator().manual_seed(0))
    assert seen["pm"][swapped].any(dim=1).all() and seen["pm"][~swapped].any(dim=1).all()
    assert (seen["ids"][swapped] == cfg.mask_token_id).any()
    assert not seen["scored"][swapped].any() and seen["scored"][~swapped].any()
    assert (seen["labels"][swapped] == objectives.IGNORE).all()


def test_masking_ratios_hold():
    gen = torch.Generator().manual_seed(0)
    has_image = torch.tensor([True] * 60 + [False] * 4)
    mask = objectives.mask_patches(64, 64, 0.25, has_image, gen)
    assert (mask[:60].sum(dim=1) == 16).all()  # exactly 25% of 64 patches per image row
    assert not mask[60:].any()  # rows without an image have nothing to predict

    ids = torch.randint(10, 100, (400, 30), generator=gen)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False
    masked, labels = objectives.mask_tokens(ids, maskable, 0.15, mask_token_id=4, vocab_size=100, generator=gen)
    picked = labels != objectives.IGNORE
    assert abs(picked.float().mean().item() - 0.15 * 29 / 30) < 0.01
    assert not picked[:, 0].any()
    share_mask = (masked[picked] == 4).float().mean().item()
    assert abs(share_mask - 0.8) < 0.03  # BERT's 80/10/10
    assert (masked[~picked] == ids[~picked]).all()


def test_swap_images_only_between_rows_with_both_modalities():
    gen = torch.Generator().manual_seed(0)
    has_image = torch.tensor([True, True, False, True, True, True])
    has_title = torch.tensor([True, True, True, True, False, True])
    source, swapped = objectives.swap_images(has_image, has_title, 1.0, gen)
    assert swapped.tolist() == [True, True, False, True, False, True]
    assert (source[swapped] != torch.arange(6)[swapped]).all()
    assert set(source[swapped].tolist()) <= {0, 1, 3, 5}
    assert source[2] == 2 and source[4] == 4


def test_patchify_is_row_major():
    s, p = 8, 4
    pixels = torch.zeros(1, s, s, 3, dtype=torch.uint8)
    pixels[0, :4, 4:] = 255  # top-right patch white
    patches = patchify(pixels, p)
    assert patches.shape == (1, 4, 48)
    assert (patches[0, 1] == 1.0).all() and (patches[0, 0] == -1.0).all()


def test_missing_modality_still_embeds_and_differs(tokenizer):
    cfg = preset_config("tiny", tokenizer)
    model = ItemModel(cfg).eval()
    batch = make_batch(tokenizer, cfg, n=4)
    full = model.encode(**batch)
    no_image = model.encode(**{**batch, "has_image": torch.zeros(4, dtype=torch.bool)})
    processor = ItemProcessor(tokenizer, cfg.image_size, cfg.max_title_len)
    empty = {k: torch.from_numpy(v) for k, v in processor.tokenize([""] * 4).items()}
    no_title = model.encode(**{**batch, **empty})
    for emb in (no_image, no_title):
        assert torch.isfinite(emb).all()
        assert not torch.allclose(emb, full)
    # the image is really ignored when has_image is False
    scrambled = model.encode(**{**batch, "has_image": torch.zeros(4, dtype=torch.bool),
                                "pixel_values": torch.randint(0, 255, batch["pixel_values"].shape, dtype=torch.uint8)})
    torch.testing.assert_close(no_image, scrambled)


def test_save_load_gives_identical_embeddings(tokenizer, tmp_path):
    cfg = preset_config("tiny", tokenizer)
    model = ItemModel(cfg).eval()
    processor = ItemProcessor(tokenizer, cfg.image_size, cfg.max_title_len)
    version = save_model_dir(model, processor, str(tmp_path))
    assert version == read_model_version(str(tmp_path)).strip()
    assert {"config.json", "model.safetensors", "processor_config.json", "model_version"} <= {p.name for p in tmp_path.iterdir()}
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    loaded, loaded_processor = load_model_dir(str(tmp_path))
    batch = make_batch(tokenizer, cfg, n=8)
    torch.testing.assert_close(model.encode(**batch), loaded.encode(**batch), rtol=0, atol=0)
    assert loaded.config.model_version == version
    assert loaded_processor.tokenizer.get_vocab() == tokenizer.get_vocab()
    # saving the same weights again gives the same version: it names the weights
    assert save_model_dir(loaded, loaded_processor, str(tmp_path / "again")) == version


def test_config_without_tokenizer_ids_fails_with_the_fix():
    from item_model import ItemConfig
    with pytest.raises(ValueError, match="preset_config"):
        ItemModel(ItemConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2))


def test_mismatched_processor_is_refused(tokenizer, tmp_path):
    cfg = preset_config("tiny", tokenizer)
    save_model_dir(ItemModel(cfg), ItemProcessor(tokenizer, cfg.image_size + 8, cfg.max_title_len), str(tmp_path))
    with pytest.raises(ValueError, match="image_size"):
        load_model_dir(str(tmp_path))


def test_unknown_preset_names_the_choices(tokenizer):
    with pytest.raises(ValueError, match="tiny"):
        preset_config("huge", tokenizer)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_trains_encodes_and_round_trips(tokenizer, variant, tmp_path):
    cfg = preset_config("tiny", tokenizer, variant=variant)
    model = build_model(cfg).train()
    batch = make_batch(tokenizer, cfg, n=16)
    losses = model(**batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    losses["loss"].backward()
    model.eval()
    emb = model.encode(**batch)
    assert emb.shape == (16, model.embedding_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(16))
    save_model_dir(model, ItemProcessor(tokenizer, cfg.image_size, cfg.max_title_len), str(tmp_path))
    loaded, _ = load_model_dir(str(tmp_path))
    assert type(loaded) is type(model)
    torch.testing.assert_close(loaded.encode(**batch), emb)


@pytest.mark.parametrize("variant,ignored", [("title_only", "image"), ("image_only", "title")])
def test_single_modality_models_ignore_the_other_input(tokenizer, variant, ignored):
    cfg = preset_config("tiny", tokenizer, variant=variant)
    model = build_model(cfg).eval()
    a, b = make_batch(tokenizer, cfg, n=8, seed=1), make_batch(tokenizer, cfg, n=8, seed=2)
    keys = ["pixel_values", "has_image"] if ignored == "image" else ["input_ids", "attention_mask"]
    mixed = {**a, **{k: b[k] for k in keys}}
    torch.testing.assert_close(model.encode(**a), model.encode(**mixed))
    assert not torch.allclose(model.encode(**a), model.encode(**b))


def test_objective_that_needs_a_missing_modality_is_refused(tokenizer):
    with pytest.raises(ValueError, match="use_itm=True needs"):
        preset_config("tiny", tokenizer, modalities="title")
