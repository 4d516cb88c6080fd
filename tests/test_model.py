"""ITEm model tests: shapes, finiteness, each objective, the global bottleneck, masking ratios, save/load."""

from __future__ import annotations

import copy
import io
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

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
    hidden, mask, patches = model.forward_encoder(**batch)
    assert mask.shape == (4, cfg.max_title_len + cfg.num_patches)
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
    monkeypatch.setattr(model, "forward_encoder", lambda ids, mask, pix, has, pm=None: seen.update(ids=ids, pm=pm) or encoder(ids, mask, pix, has, pm))
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


# --- issue 10: pooling, corpus centre, view consistency, and the training input of a row without title ---


def test_a_row_trained_without_its_title_sees_the_inference_input_of_an_empty_title(tokenizer, monkeypatch):
    """Modality dropout must turn a title into [CLS] [SEP] (what the processor makes of ""), not [CLS] alone."""
    cfg = preset_config("tiny", tokenizer, modality_dropout=1.0, use_itm=False)
    model = ItemModel(cfg).train()
    batch = make_batch(tokenizer, cfg, n=32)
    seen = {}
    encoder = model.forward_encoder
    monkeypatch.setattr(model, "forward_encoder", lambda ids, mask, pix, has, pm=None:
                        seen.update(ids=ids, mask=mask, has=has) or encoder(ids, mask, pix, has, pm))
    model(**batch, generator=torch.Generator().manual_seed(0))
    no_title = seen["mask"].sum(dim=1) <= 2
    assert no_title.any() and seen["has"][no_title].all()  # the image-only training rows
    empty = ItemProcessor(tokenizer, cfg.image_size, cfg.max_title_len).tokenize([""])
    t = seen["ids"].shape[1]
    for row in no_title.nonzero().flatten():
        assert seen["ids"][row].tolist() == empty["input_ids"][0, :t].tolist()
        assert seen["mask"][row].tolist() == empty["attention_mask"][0, :t].tolist()


def test_mean_pooling_averages_the_attended_states_only(tokenizer):
    cfg = preset_config("tiny", tokenizer, pooling="mean")
    model = ItemModel(cfg).eval()
    batch = make_batch(tokenizer, cfg, n=4)
    batch["has_image"][0] = False
    hidden, mask, _ = model.forward_encoder(**batch)
    expected = torch.stack([hidden[i][mask[i].bool()].mean(0) for i in range(4)])
    torch.testing.assert_close(model.encode(**batch), torch.nn.functional.normalize(expected, dim=-1))
    model.config.pooling = "cls"
    torch.testing.assert_close(model.encode(**batch), torch.nn.functional.normalize(hidden[:, 0], dim=-1))


def test_padding_columns_change_nothing(tokenizer):
    """encode trims the title columns that are padding everywhere: the vectors are those of the full width."""
    cfg = preset_config("tiny", tokenizer, pooling="mean")
    model = ItemModel(cfg).eval()
    batch = make_batch(tokenizer, cfg, n=4)
    hidden, mask, _ = model.forward_encoder(**batch)
    full_width = torch.nn.functional.normalize(model.pool(hidden, mask), dim=-1)
    assert int(batch["attention_mask"].sum(1).max()) < cfg.max_title_len  # there is padding to trim
    torch.testing.assert_close(model.encode(**batch), full_width, atol=1e-5, rtol=1e-5)


def test_corpus_centre_spreads_collinear_vectors_and_is_saved(tokenizer, tmp_path):
    cfg = preset_config("tiny", tokenizer)
    model = ItemModel(cfg).eval()
    batch = make_batch(tokenizer, cfg, n=32)

    def mean_cos(e):
        return float((e @ e.T)[~torch.eye(len(e), dtype=torch.bool)].mean())

    before = model.encode(**batch)
    assert mean_cos(before) > 0.9  # a random encoder's [CLS] vectors point one way
    assert model.fit_embedding_space([batch]) == 32
    after = model.encode(**batch)
    assert mean_cos(after) < 0.1
    torch.testing.assert_close(after.norm(dim=-1), torch.ones(32))
    save_model_dir(model, ItemProcessor(tokenizer, cfg.image_size, cfg.max_title_len), str(tmp_path))
    loaded, _ = load_model_dir(str(tmp_path))
    torch.testing.assert_close(loaded.encode(**batch), after, rtol=0, atol=0)


def test_partial_whitening_evens_out_the_leading_directions_and_an_old_model_dir_loads_without_it(tokenizer, tmp_path):
    cfg = preset_config("tiny", tokenizer)
    model = ItemModel(cfg).eval()
    batch = make_batch(tokenizer, cfg, n=96)  # more rows than the 32 dimensions

    def spectrum(e):  # the variances of the published vectors along their principal directions, descending
        return torch.linalg.eigvalsh(torch.cov(e.double().T)).flip(0)

    model.fit_embedding_space([batch])
    centred = model.encode(**batch)
    model.fit_embedding_space([batch], whiten_shrink=1.0)
    whitened = model.encode(**batch)
    lead_centred, lead_whitened = (float(s[0] / s.mean()) for s in (spectrum(centred), spectrum(whitened)))
    assert lead_whitened < 0.7 * lead_centred, (lead_centred, lead_whitened)
    torch.testing.assert_close(whitened.norm(dim=-1), torch.ones(96))
    # the same space from raw vectors given directly (what bench/compare_models.py fits several times)
    other = copy.deepcopy(model)
    other.reset_embedding_space()
    other.set_embedding_space(other.encode(**batch), whiten_shrink=1.0)
    torch.testing.assert_close(other.encode(**batch), whitened, rtol=0, atol=1e-6)
    model.fit_embedding_space([batch], whiten_shrink=1e9)  # a huge shrink scales every direction alike
    torch.testing.assert_close(model.encode(**batch), centred, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="whiten_shrink must be > 0"):
        model.fit_embedding_space([batch], whiten_shrink=0.0)

    # a model dir saved before the whitening existed: its weights without the buffer load with the identity
    model.fit_embedding_space([batch])
    save_model_dir(model, ItemProcessor(tokenizer, cfg.image_size, cfg.max_title_len), str(tmp_path))
    weights = os.path.join(tmp_path, "model.safetensors")
    state = load_file(weights)
    del state["embedding_whitening"]
    save_file(state, weights, metadata={"format": "pt"})
    reports = io.StringIO()
    handler = logging.StreamHandler(reports)
    logging.getLogger("transformers").addHandler(handler)  # where transformers' load report goes
    try:
        loaded, _ = load_model_dir(str(tmp_path))
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert "embedding_whitening" not in reports.getvalue()  # no "newly initialized" load report
    torch.testing.assert_close(loaded.embedding_whitening, torch.eye(32), rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode(**batch), centred, rtol=0, atol=1e-6)


def test_view_consistency_is_a_switchable_objective_that_trains_the_image_stream(tokenizer):
    cfg = preset_config("tiny", tokenizer, variant="item_contrastive")
    model = ItemModel(cfg).train()
    losses = model(**make_batch(tokenizer, cfg), generator=torch.Generator().manual_seed(0))
    assert set(losses) == {*OBJECTIVES, "view", "view_image", "view_title", "loss"} and torch.isfinite(losses["view"])
    # the view term is the mean of its two parts, reported apart (not added to the loss again)
    torch.testing.assert_close(losses["view"], (losses["view_image"] + losses["view_title"]) / 2)
    assert not losses["view_image"].requires_grad and losses["view_image"] > 0
    # the view term alone reaches the patch stem
    cfg_view = preset_config("tiny", tokenizer, use_view_contrastive=True, **{f"use_{o}": False for o in OBJECTIVES})
    model = ItemModel(cfg_view).train()
    losses = model(**make_batch(tokenizer, cfg_view), generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"view", "view_image", "view_title", "loss"}
    torch.testing.assert_close(losses["loss"], losses["view"])
    losses["loss"].backward()
    assert model.embeddings.patch_projection.weight.grad.abs().sum() > 0
    assert model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_the_cross_modal_view_term_is_off_by_default_and_reaches_the_patch_stem_alone(tokenizer):
    assert preset_config("tiny", tokenizer, variant="item_contrastive").view_cross_weight == 0  # no variant turns it on
    off = {f"use_{o}": False for o in OBJECTIVES}
    cfg = preset_config("tiny", tokenizer, use_view_contrastive=True, view_cross_weight=2.0, **off)
    model = ItemModel(cfg).train()
    losses = model(**make_batch(tokenizer, cfg), generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"view", "view_image", "view_title", "view_cross", "loss"} and losses["view_cross"] > 0
    torch.testing.assert_close(losses["loss"], losses["view"] + 2.0 * losses["view_cross"])
    model.zero_grad()
    losses["view_cross"].backward()  # photo against title, no joint anchor: both streams learn from it
    assert model.embeddings.patch_projection.weight.grad.abs().sum() > 0
    assert model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_info_nce_prefers_matching_rows():
    a = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    matched = objectives.info_nce(a, a, 0.05)
    shuffled = objectives.info_nce(a, a.roll(1, dims=0), 0.05)
    assert matched < 0.1 < shuffled


def test_augmented_views_are_seeded_crops_of_the_photo():
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8))
    first = objectives.augment_images(pixels, 0.5, torch.Generator().manual_seed(1))
    again = objectives.augment_images(pixels, 0.5, torch.Generator().manual_seed(1))
    other = objectives.augment_images(pixels, 0.5, torch.Generator().manual_seed(2))
    assert first.shape == (4, 32, 32, 3) and first.min() >= 0 and first.max() <= 255
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other) and not torch.equal(first, pixels.float())


def test_a_zoomed_out_view_lies_on_a_grey_backdrop_or_on_one_of_any_colour():
    black = torch.zeros(16, 32, 32, 3, dtype=torch.uint8)  # only the backdrop shows colour
    corners = {}
    for backdrop in ("light", "any"):  # crop_scale_min 1 and zoom_out_max 0.5: every view is zoomed out
        view = objectives.augment_images(black, 1.0, torch.Generator().manual_seed(0), zoom_out_max=0.5, backdrop=backdrop)
        corners[backdrop] = torch.cat([view[:, 0, 0], view[:, 0, -1], view[:, -1, 0], view[:, -1, -1]])
    spread = {name: (c.max(dim=1).values - c.min(dim=1).values) for name, c in corners.items()}  # across R, G, B
    assert spread["light"].max() < 1e-3  # grey: brightness and contrast scale the three channels alike
    assert (spread["any"] > 20).float().mean() > 0.5  # coloured


def test_the_joint_pass_sees_an_augmented_photo_only_when_asked_and_only_in_training(tokenizer, monkeypatch):
    calls = []
    real = objectives.augment_images
    monkeypatch.setattr(objectives, "augment_images",
                        lambda pixels, *a, **kw: calls.append(len(pixels)) or real(pixels, *a, **kw))
    for augment_joint, expected in ((False, 1), (True, 2)):  # the image-only view, and the joint pass
        cfg = preset_config("tiny", tokenizer, variant="item_contrastive", view_augment_joint=augment_joint)
        batch = make_batch(tokenizer, cfg, n=16)
        calls.clear()
        ItemModel(cfg).train()(**batch, generator=torch.Generator().manual_seed(0))
        assert len(calls) == expected and (not augment_joint or calls[0] == 16)  # the joint pass: every row
    calls.clear()
    with torch.no_grad():
        ItemModel(cfg).eval().encode(**batch)
    assert calls == []


def test_drop_tokens_keeps_cls_and_sep():
    ids = torch.tensor([[101, 5, 6, 7, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    out_ids, out_mask = objectives.drop_tokens(ids, mask, 1.0, (101, 102), 0)
    assert out_ids.tolist() == [[101, 0, 0, 0, 102, 0]] and out_mask.tolist() == [[1, 0, 0, 0, 1, 0]]


def test_conv_patch_stem_keeps_patches_apart_trains_and_reloads(tokenizer, tmp_path):
    """patch_stem='conv': one token per patch as the linear stem gives, a patch's token depends on that
    patch alone (MIM's masked patches leak nothing), the stem learns, and the model dir reloads it."""
    cfg = preset_config("tiny", tokenizer, variant="item_contrastive")
    assert cfg.patch_stem == "conv"  # the default model's stem (docs/evaluation.md, run 8)
    model = ItemModel(cfg).train()
    stem = model.embeddings.patch_projection
    patches = torch.randn(2, cfg.num_patches, cfg.patch_dim, generator=torch.Generator().manual_seed(0))
    changed = patches.clone()
    changed[:, 3] += 1.0  # one patch's pixels change
    with torch.no_grad():
        a, b = stem(patches), stem(changed)
    assert a.shape == (2, cfg.num_patches, cfg.hidden_size) and a.std() > 0.2  # He init: the signal survives
    moved = (a - b).abs().amax(dim=(0, 2))
    assert moved[3] > 0 and torch.count_nonzero(moved) == 1
    batch = make_batch(tokenizer, cfg)
    losses = model(**batch, generator=torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert stem.convs[0].weight.grad.abs().sum() > 0
    save_model_dir(model, ItemProcessor(tokenizer, cfg.image_size, cfg.max_title_len), str(tmp_path))
    loaded, _ = load_model_dir(str(tmp_path))
    assert loaded.config.patch_stem == "conv"
    model.eval()
    torch.testing.assert_close(loaded.encode(**batch), model.encode(**batch))
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        ItemModel(preset_config("tiny", tokenizer, patch_stem="conv", patch_size=6, image_size=36))


def test_whole_image_conv_stem_reaches_the_neighbours_only_and_a_masked_patch_reaches_nothing(tokenizer):
    """patch_stem='conv_image': the stem's convolutions run over the whole photo, so a patch's pixels move
    its own token and those of the patches next to it (the grid is patchify's, row-major) and no other;
    under MIM a masked patch is blanked before the stem and moves no token at all."""
    cfg = preset_config("tiny", tokenizer, variant="item_contrastive", patch_stem="conv_image")
    model = ItemModel(cfg).eval()
    g = cfg.image_size // cfg.patch_size
    patches = torch.randn(2, cfg.num_patches, cfg.patch_dim, generator=torch.Generator().manual_seed(0))
    changed = patches.clone()
    row, col = 1, 2
    changed[:, row * g + col] += 1.0
    with torch.no_grad():
        moved = (model.embeddings.patch_projection(patches) - model.embeddings.patch_projection(changed)).abs().amax(dim=(0, 2))
        mask = torch.zeros(2, cfg.num_patches, dtype=torch.bool)
        mask[:, row * g + col] = True
        masked = (model.embeddings.embed_image(patches, mask) - model.embeddings.embed_image(changed, mask)).abs().amax()
    near = {r * g + c for r in range(row - 1, row + 2) for c in range(col - 1, col + 2) if 0 <= r < g and 0 <= c < g}
    assert moved[row * g + col] > 0 and any(moved[i] > 0 for i in near - {row * g + col})
    assert all(moved[i] == 0 for i in range(cfg.num_patches) if i not in near)
    assert masked == 0
    batch = make_batch(tokenizer, cfg)
    model.train()(**batch, generator=torch.Generator().manual_seed(0))["loss"].backward()
    assert model.embeddings.patch_projection.convs[0].weight.grad.abs().sum() > 0
