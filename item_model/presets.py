"""The named model variants and size presets, as plain dicts of ItemConfig fields.

Kept apart from config.py (and free of imports) so that the command line can offer the names as choices
without importing transformers.
"""

# Variants: the model compared in EVALUATION.md, each a set of config switches over the same code.
_OFF = dict(use_itm=False, use_mlm=False, use_mim=False, use_global_mlm=False, use_global_mim=False)
VARIANTS: dict[str, dict] = {
    "item": {},  # all five objectives
    "item_no_global": dict(use_global_mlm=False, use_global_mim=False),  # ViLT-style: the paper's ablation
    # the five objectives plus view consistency (ours) on the mean of the states, published by that mean; the
    # photo of the image-only view and of the joint pass re-framed onto plain backdrops of any colour; patches
    # read by a small convolutional stem: the recipe that measured best on re-listings (docs/evaluation.md,
    # runs 5, 6 and 8)
    "item_contrastive": dict(use_view_contrastive=True, view_pooling="mean", pooling="mean",
                             view_zoom_out_max=0.3, view_backdrop="any", view_augment_joint=True, patch_stem="conv"),
    "title_only": dict(modalities="title", use_itm=False, use_mim=False, use_global_mim=False),
    "image_only": dict(modalities="image", use_itm=False, use_mlm=False, use_global_mlm=False),
    # separate title and image encoders of half the depth each, trained contrastively
    "two_stream": dict(architecture="two_stream", use_contrastive=True, **_OFF),
}

# Presets: name -> architecture. The names say the shape, as timm's do.
PRESETS: dict[str, dict] = {
    # tests: a forward pass in milliseconds
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, max_title_len=16,
    ),
    # trains on a 2-core CPU in minutes: 4 layers, 256 wide, 64 px images, 64 patches of 8 px
    "small": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        image_size=64, patch_size=8, max_title_len=32,
    ),
    # all-MiniLM-L6-v2's text geometry (6 x 384, 12 heads), so `--init-from minilm` starts from it; the
    # image stream sees the fashion photos at their own 80 px height (letterboxed), 25 patches of 16 px.
    # Titles of real listings are 12 tokens at the median, 22 at most in the fashion catalog: 24 slots.
    "minilm": dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        image_size=80, patch_size=16, max_title_len=24,
    ),
    # BERT-base encoder (12 x 768), ViT-B/16 image stream at 224 px: for GPU clusters
    "base": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        image_size=224, patch_size=16, max_title_len=48,
    ),
}
