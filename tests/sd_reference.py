"""The reference side of the Stable Diffusion network tests: tiny diffusers/transformers parts.

Each builder makes a tiny random component of the real architecture with the reference
library, moves every parameter off its initial value (so that norm scales, zero biases
and zero-initialised layers are tested too), and saves it with ``save_pretrained``.
The tokenizer writer produces a small CLIP vocabulary and merges in the published
``tokenizer/`` layout (SD 1.x pads with ``<|endoftext|>``, SD 2.x with ``!``).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from sdedit_jax.tools.published_sd import (  # noqa: F401 (the tests' published structures)
    CLIP_VIT_L,
    OPENCLIP_H,
    SD15_UNET,
    SD21_UNET,
    SD_VAE,
)

# Tiny UNet2DConditionModel configs with SD 1.x's and SD 2.x's structure.
UNET_SD1 = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,  # SD 1.x: 8 heads at every level
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
UNET_SD2 = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": (2, 4),  # SD 2.x: head counts per level (5, 10, 20, 20 at full size)
    "use_linear_projection": True,
    "upcast_attention": True,
    "transformer_layers_per_block": (1, 2),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
# SDXL's structure: no attention at level 0, transformer depth per level, linear
# projections, and the text_time added embedding (pooled text + 6 time ids x 8 features;
# the refiner's 5 ids: sizes, crop and the aesthetic score).
UNET_SDXL = {
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "cross_attention_dim": 64,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "transformer_layers_per_block": (1, 2),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}
UNET_SDXL_REFINER = {
    **UNET_SDXL,
    "cross_attention_dim": 32,
    "projection_class_embeddings_input_dim": 32 + 5 * 8,
}
VAE = {
    "block_out_channels": (32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "layers_per_block": 1,
    "latent_channels": 4,
    "sample_size": 32,
    "scaling_factor": 0.13025,
}
TEXT = {
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "bos_token_id": 998,
    "eos_token_id": 999,
    "pad_token_id": 999,
}


def rel_err(found, expected) -> float:
    """Largest absolute difference relative to the reference's RMS (its output scale)."""
    expected = np.asarray(expected, np.float64)
    scale = np.sqrt(np.mean(np.square(expected)))
    return float(np.max(np.abs(np.asarray(found, np.float64) - expected)) / scale)


def perturb(model, seed: int, scale: float = 0.02):
    """Adds ``scale`` * N(0, 1) to every parameter, in place; returns the model in eval mode."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
    return model.eval()


def save_unet(folder: str, config: dict, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = perturb(UNet2DConditionModel(**config), seed)
    model.save_pretrained(folder)
    return model


def save_vae(folder: str, seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = perturb(AutoencoderKL(**VAE), seed)
    model.save_pretrained(folder)
    return model


def save_text_encoder(folder: str, hidden_act: str, seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = perturb(CLIPTextModel(CLIPTextConfig(**TEXT, hidden_act=hidden_act)), seed)
    model.save_pretrained(folder)
    return model


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's printable stand-in character for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


WORDS = (
    "a an the of in on with and photo painting portrait red blue green barn cat dog house "
    "castle sunset over mountains highly detailed trending art station oil canvas digital "
    "city night rain light dark forest river lake 4k 8k hdr café naïve über straße 日本 東京 "
    "théâtre ok it's don't we'll you're they've i'm he'd"
).split()
PREFIXES = ("th", "in", "er", "re", "an", "on", "st", "ing", "ed")


def write_tokenizer(folder: str, pad_token: str = "<|endoftext|>") -> None:
    """A small CLIP ``vocab.json``/``merges.txt`` with SD's token configs, in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    byte_chars = bytes_to_unicode()
    base = [byte_chars[b] for b in range(256)]
    vocab = {tok: i for i, tok in enumerate(base + [c + "</w>" for c in base])}
    merges: list[tuple[str, str]] = []

    def chain(symbols: list[str]) -> None:
        left = symbols[0]
        for right in symbols[1:]:
            if left + right not in vocab:
                merges.append((left, right))
                vocab[left + right] = len(vocab)
            left += right

    for prefix in PREFIXES:
        chain([byte_chars[b] for b in prefix.encode()])
    for word in WORDS:
        for piece in word.replace("'", " '").split():
            symbols = [byte_chars[b] for b in piece.encode()]
            symbols[-1] += "</w>"
            if len(symbols) > 1:
                chain(symbols)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {
        "bos_token": {
            "content": "<|startoftext|>",
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        },
        "eos_token": {
            "content": "<|endoftext|>",
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        },
        "unk_token": {
            "content": "<|endoftext|>",
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        },
        "pad_token": pad_token,
    }
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)
    config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
        **special,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


def varied_texts(count: int = 240, seed: int = 0) -> list[str]:
    """Prompts of every kind a tokenizer trips on: case, Unicode forms, punctuation,
    whitespace, special tokens in the text, empty and over-long ones."""
    fixed = [
        "",
        " ",
        "a red barn",
        "A RED BARN",
        "a  red\tbarn\n\nat   night",
        "it's a cat, isn't it? They'll say: 'yes'!",
        "IT'S WE'LL YOU'RE THEY'VE I'M HE'D",
        "café naïve über straße",
        "cafe\u0301 nai\u0308ve",  # decomposed: NFC must compose them
        "東京の夜景, 日本",
        "emoji 🐱🐶🏰 and ❤️",
        "\u00a0non-breaking\u3000ideographic\u2003em space",
        "<|startoftext|>hello<|endoftext|>",
        "text <|endoftext|> inside",
        "<|ENDOFTEXT|> upper",
        "!!!???...;;;",
        "4k 8k hdr 1234567890 3.14 1,000",
        "((masterpiece)), [best quality], {detailed}",
        "ÀÉÎÕÜ ÇÑ ß ẞ",
        "\u0130stanbul \u0131",  # dotted/dotless i lower-casing
        "x" * 300,
        " ".join(["a photo of a castle"] * 40),
        "tab\tnew\nline\rcarriage",
        "zero\u200bwidth\u200djoiner",
        "mixed123abc456",
        "Ελληνικά кириллица العربية עברית हिन्दी",
    ]
    rng = np.random.default_rng(seed)
    pieces = list(WORDS) + [
        "RED",
        "Photo",
        "unknownword",
        "zzz",
        ",",
        ".",
        "!",
        "?",
        "'s",
        "'S",
        "-",
        "—",
        "…",
        "🙂",
        "é",
        "ü",
        "€",
        "100%",
        "<|endoftext|>",
        "  ",
        "\t",
        "\n",
        "ﬁ",  # a ligature NFC keeps (NFKC would split it)
        "Ⅻ",
    ]
    texts = list(fixed)
    while len(texts) < count:
        n = int(rng.integers(1, 60))
        words = rng.choice(pieces, size=n)
        seps = rng.choice(["", " ", " ", " ", "  "], size=n)
        texts.append("".join(w + s for w, s in zip(words, seps, strict=True)))
    return texts


PUBLISHED = {"sd15": (SD15_UNET, CLIP_VIT_L), "sd21": (SD21_UNET, OPENCLIP_H)}


def published_structures(version: str) -> tuple[dict, dict, dict]:
    """The full-size U-Net, VAE and text encoder of ``version`` (a key of ``PUBLISHED``),
    built by diffusers/transformers on torch's meta device (shapes, no weights), with the
    U-Net's and text encoder's configs: ``(models, unet_json, text_json)``."""
    import diffusers
    import torch
    import transformers

    unet_json, text_json = PUBLISHED[version]
    text_fields = {k: v for k, v in text_json.items() if k != "model_type"}
    with torch.device("meta"):
        models = {
            "unet": diffusers.UNet2DConditionModel.from_config(unet_json),
            "vae": diffusers.AutoencoderKL.from_config(SD_VAE),
            "text": transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_fields)),
        }
    return models, unet_json, text_json


def sd_scheduler(prediction_type: str = "epsilon"):
    """The published SD folders' own scheduler (DDIM with leading spacing, steps_offset 1)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


# (UNet config, text encoder activation, tokenizer pad token) of each tiny structure.
PIPELINES = {"sd1": (UNET_SD1, "quick_gelu", "<|endoftext|>"), "sd2": (UNET_SD2, "gelu", "!")}


def save_pipeline(
    folder: str, version: str = "sd1", prediction_type: str = "epsilon", seed: int = 0, **save
):
    """A whole tiny ``StableDiffusionImg2ImgPipeline`` folder, saved by diffusers itself
    (``save`` goes to ``save_pretrained``, e.g. ``variant="fp16"``, ``safe_serialization``)."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from transformers import CLIPTokenizer

    unet_config, hidden_act, pad_token = PIPELINES[version]
    parts = os.path.join(folder, "_parts")
    write_tokenizer(os.path.join(parts, "tokenizer"), pad_token)
    pipe = StableDiffusionImg2ImgPipeline(
        unet=save_unet(os.path.join(parts, "unet"), unet_config, seed),
        vae=save_vae(os.path.join(parts, "vae"), seed + 1),
        text_encoder=save_text_encoder(os.path.join(parts, "text"), hidden_act, seed + 2),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(parts, "tokenizer")),
        scheduler=sd_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if "variant" in save:
        pipe = pipe.to(torch.float16)
    pipe.save_pretrained(folder, **save)
    shutil.rmtree(parts)
    return pipe


def save_text_encoder_with_projection(
    folder: str,
    eos_token_id: int = 2,
    seed: int = 0,
    projection_dim: int = 24,
    hidden_size: int = TEXT["hidden_size"],
):
    """SDXL's second text encoder (``CLIPTextModelWithProjection``), tiny, GELU."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    fields = {**TEXT, "eos_token_id": eos_token_id, "hidden_size": hidden_size}
    config = CLIPTextConfig(**fields, hidden_act="gelu", projection_dim=projection_dim)
    model = perturb(CLIPTextModelWithProjection(config), seed)
    model.save_pretrained(folder)
    return model


def save_xl_pipeline(
    folder: str,
    refiner: bool = False,
    seed: int = 0,
    width_2: int = TEXT["hidden_size"],
    **unet_changes,
):
    """A whole tiny ``StableDiffusionXLImg2ImgPipeline`` folder (base, or the refiner:
    ``text_encoder_2`` only, aesthetic scores), saved by diffusers itself. ``width_2``:
    the second encoder's width and projection (square, as ViT-bigG's; the U-Net's widths
    follow); diffusers' single-file loader tells the base's encoders apart by their widths.
    ``unet_changes`` replace fields of the U-Net's config (a bigger one, say)."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTokenizer

    parts = os.path.join(folder, "_parts")
    unet_config = UNET_SDXL_REFINER if refiner else UNET_SDXL
    first_width = 0 if refiner else TEXT["hidden_size"]
    ids = 5 if refiner else 6
    unet_config = {
        **unet_config,
        "cross_attention_dim": first_width + width_2,
        "projection_class_embeddings_input_dim": width_2
        + ids * unet_config["addition_time_embed_dim"],
        **unet_changes,
    }
    write_tokenizer(os.path.join(parts, "tokenizer_2"), "!")
    text_2 = save_text_encoder_with_projection(
        os.path.join(parts, "text_2"), 2, seed + 3, projection_dim=width_2, hidden_size=width_2
    )
    first = {"text_encoder": None, "tokenizer": None}
    if not refiner:
        write_tokenizer(os.path.join(parts, "tokenizer"), "<|endoftext|>")
        first = {
            "text_encoder": save_text_encoder(os.path.join(parts, "text"), "quick_gelu", seed + 2),
            "tokenizer": CLIPTokenizer.from_pretrained(os.path.join(parts, "tokenizer")),
        }
    pipe = StableDiffusionXLImg2ImgPipeline(
        unet=save_unet(os.path.join(parts, "unet"), unet_config, seed),
        vae=save_vae(os.path.join(parts, "vae"), seed + 1),
        text_encoder_2=text_2,
        tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(parts, "tokenizer_2")),
        scheduler=sd_scheduler(),
        requires_aesthetics_score=refiner,
        force_zeros_for_empty_prompt=not refiner,
        **first,
    )
    pipe.save_pretrained(folder)
    shutil.rmtree(parts)
    torch.manual_seed(seed)
    return pipe
