#!/usr/bin/env python3
"""Generate the diffusers reference fixtures used by sd-studio's Rust tests.

What it makes (everything under ``tests/fixtures/``):

* ``tiny-sd15/``  -- a tiny, random-weight, SD-1.5-shaped pipeline (epsilon
  prediction, PNDM scheduler config copied from runwayml/stable-diffusion-v1-5)
  in the exact diffusers folder layout, weights stored as float16 safetensors
  with the regular file names (``diffusion_pytorch_model.safetensors``,
  ``model.safetensors``).
* ``tiny-sd2v/``  -- a tiny, random-weight, SD-2.x-shaped pipeline
  (v_prediction, DDIM scheduler config copied from
  stabilityai/stable-diffusion-2-1, linear-projection transformers,
  per-block head counts, tokenizer padding with "!"), weights stored as the
  ``fp16`` variant (``*.fp16.safetensors`` only).
* Both carry a ``tokenizer/`` folder (vocab.json, merges.txt,
  tokenizer_config.json, special_tokens_map.json) rebuilt from the real CLIP
  BPE file ``bpe_simple_vocab_16e6.txt.gz`` in the layout the hub's
  openai/clip-vit-large-patch14 tokenizer uses (49408 tokens).
* ``refs/`` -- reference outputs computed by diffusers/transformers on CPU in
  float32 from the models *as reloaded from disk* (so the references match
  the float16-rounded weights the Rust side will read):
    - ``tokens.json``: token ids for tricky prompts with both tokenizers;
    - ``randn.safetensors`` / ``randn.json``: ``torch.randn`` draws from
      seeded CPU ``torch.Generator``s (single draws and sequences);
    - ``components_<model>.safetensors``: text encoder, UNet and VAE-decoder
      inputs/outputs;
    - ``schedulers.json``: timesteps / sigmas / init_noise_sigma of each
      scheduler after ``set_timesteps``;
    - ``latents_64x64.safetensors``, ``images/*.png``, ``cases.json``:
      full text-to-image pipeline runs;
    - ``taesd_tiny.safetensors``: latents and the decode of ``tiny-taesd/``;
    - ``vae_tiling_tiny-sd15.safetensors``: latents, their tiled decode
      (``vae.enable_tiling()``) and untiled decode (``--only memory``).
* ``tiny-taesd/`` -- a tiny random-weight ``AutoencoderTiny`` (TAESD's
  architecture, 16 channels instead of 64) for the preview decoder's parity test.
  ``--only taesd`` rebuilds just this model and its reference, leaving every
  other fixture untouched.

How to run (from the repository root)::

    pip install torch diffusers transformers safetensors numpy scipy pillow open_clip_torch
    python tests/make_fixtures.py            # finds the BPE file via `import open_clip`
    python tests/make_fixtures.py --bpe /path/to/bpe_simple_vocab_16e6.txt.gz

Token ids come from the pipeline's own ``transformers.CLIPTokenizer`` (in
transformers >= 5 that is the only CLIP tokenizer; there is no "slow" one any
more); they are cross-checked against an independent pure-Python BPE written
here, and the script fails if the two disagree.

Nothing is downloaded: every model is built from a config with random
weights (``torch.manual_seed`` before each build), so the output is
deterministic for a given torch/diffusers/transformers version.  Everything
runs on CPU in float32 with ``torch.set_num_threads(2)``.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import re
import shutil
import sys
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusers import (
    AutoencoderTiny,
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.utils import logging as transformers_logging

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
REFS = FIXTURES / "refs"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# the hub CLIP tokenizers use the first 49152 - 256 - 2 merges of the BPE file
N_MERGES = 49152 - 256 - 2

PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"

# Scheduler config files, written verbatim as the hub repos ship them.
# Note: neither has a "timestep_spacing" key, so schedulers created with
# from_config() fall back to their own class default spacing.
SD15_SCHEDULER_JSON = """{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}
"""

SD21_SCHEDULER_JSON = """{
  "_class_name": "DDIMScheduler",
  "_diffusers_version": "0.8.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "num_train_timesteps": 1000,
  "prediction_type": "v_prediction",
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null
}
"""

# A scheduler config with only the keys a minimal one has (class, training betas): every
# other field takes the class default, which is where samplers differ most (DDIM and DDPM
# clip x0 by default, PNDM runs its Runge-Kutta warm-up, the spacings differ).
MINIMAL_SCHEDULER_JSON = """{
  "_class_name": "DDIMScheduler",
  "_diffusers_version": "0.42.1",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085
}
"""

SCHEDULER_NAMES = ["euler", "euler-a", "ddim", "dpm++2m", "dpm++2m-karras", "pndm"]
# Added with the full scheduler set (issue 4); kept separate so the first cases keep their order.
MORE_SCHEDULERS = [
    "heun", "lms", "lms-karras", "dpm2", "dpm2-a", "dpm++2m-sde", "dpm++2m-sde-karras",
    "unipc", "ddpm", "lcm",
]
ALL_SCHEDULERS = SCHEDULER_NAMES + MORE_SCHEDULERS


# --------------------------------------------------------------------------
# Tokenizer files
# --------------------------------------------------------------------------


def find_bpe(path_arg: str | None) -> Path:
    if path_arg:
        p = Path(path_arg)
        if not p.is_file():
            sys.exit(f"--bpe {p} does not exist")
        return p
    # Locate the installed open_clip package without executing its __init__
    # (which pulls in optional deps such as ftfy); fall back to importing it.
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        pkg_dir = Path(list(spec.submodule_search_locations)[0])
    else:
        try:
            import open_clip  # only used to locate its data file
        except ImportError:
            sys.exit("open_clip is not importable; pass --bpe /path/to/bpe_simple_vocab_16e6.txt.gz")
        pkg_dir = Path(open_clip.__file__).resolve().parent
    p = pkg_dir / "bpe_simple_vocab_16e6.txt.gz"
    if not p.is_file():
        sys.exit(f"{p} not found; pass --bpe explicitly")
    return p


def byte_to_unicode_table() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode char map, in CLIP's vocab order.

    Bytes that are already printable (and not space) map to themselves and come
    first, in increasing order; the 68 remaining bytes are mapped, in increasing
    byte order, onto code points 256, 257, ... and follow them.
    """
    printable = (
        list(range(0x21, 0x7F))  # '!' .. '~'
        + list(range(0xA1, 0xAD))  # '¡' .. '¬'
        + list(range(0xAE, 0x100))  # '®' .. 'ÿ'
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def build_vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(bpe_path, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    assert len(merges) == N_MERGES and all(len(m) == 2 for m in merges)
    units = list(byte_to_unicode_table().values())
    tokens = units + [u + "</w>" for u in units] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408, len(vocab)
    return vocab, merges


def _special(content: str, with_type: bool) -> dict:
    d = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    if with_type:
        d = {"__type": "AddedToken", **d}
    return d


def write_tokenizer(dirpath: Path, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str) -> None:
    """Write the 4 files the hub CLIP tokenizer folders of SD 1.5 / SD 2.1 contain."""
    if dirpath.exists():
        shutil.rmtree(dirpath)
    dirpath.mkdir(parents=True)
    # compact JSON (same mapping as the hub file, smaller on disk)
    with open(dirpath / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    with open(dirpath / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    cfg = {
        "add_prefix_space": False,
        "bos_token": _special(BOS, True),
        "do_lower_case": True,
        "eos_token": _special(EOS, True),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _special(EOS, True),
    }
    with open(dirpath / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    smap = {
        "bos_token": _special(BOS, False),
        "eos_token": _special(EOS, False),
        "pad_token": pad_token,
        "unk_token": _special(EOS, False),
    }
    with open(dirpath / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(smap, f, indent=2)
        f.write("\n")


class ReferenceBPE:
    """Independent pure-Python CLIP tokenizer used only to cross-check transformers.

    Text clean-up: NFC, collapse whitespace runs to one space, strip, lowercase
    (what openai's CLIP does minus ftfy's mojibake repair).  ``specials`` are
    cut out of the text before BPE and mapped straight to their ids, as
    transformers does with a tokenizer's special tokens -- which includes the
    pad token, so SD 2's pad token "!" turns every "!" into id 0.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str]):
        import regex

        self.specials_re = regex.compile("(" + "|".join(regex.escape(t) for t in specials) + ")")
        self.specials = set(specials)
        self.vocab = vocab
        self.rank = {m: i for i, m in enumerate(merges)}
        self.byte_map = byte_to_unicode_table()
        self.word_re = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.ws_re = regex.compile(r"\s+")
        self.cache: dict[str, list[str]] = {}

    def _bpe(self, word: str) -> list[str]:
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best = None
            for i in range(len(parts) - 1):
                r = self.rank.get((parts[i], parts[i + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, parts[i], parts[i + 1])
            if best is None:
                break
            _, a, b = best
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text: str, pad_id: int, max_len: int = 77) -> list[int]:
        text = self.ws_re.sub(" ", unicodedata.normalize("NFC", text)).strip().lower()
        ids: list[int] = []
        for segment in self.specials_re.split(text):
            if segment in self.specials:
                ids.append(self.vocab[segment])
                continue
            for w in self.word_re.findall(segment):
                mapped = "".join(self.byte_map[b] for b in w.encode("utf-8"))
                ids.extend(self.vocab[p] for p in self._bpe(mapped))
        ids = [self.vocab[BOS]] + ids[: max_len - 2] + [self.vocab[EOS]]
        return ids + [pad_id] * (max_len - len(ids))


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def randomize_norms(module: torch.nn.Module, seed: int) -> None:
    """Give every LayerNorm/GroupNorm a random affine part, as trained models have.

    Freshly initialised norms (weight 1, bias 0) make e.g. CLIP's output mean exactly zero,
    which hides mistakes and makes A1111's mean-restoring prompt emphasis divide 0 by 0.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


def build_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=64,
    )


def build_sd15_components() -> dict:
    torch.manual_seed(1501)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    vae = build_vae(1502)
    torch.manual_seed(1503)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=16,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    scheduler = PNDMScheduler.from_config(json.loads(SD15_SCHEDULER_JSON))
    for i, m in enumerate((unet, vae, text_encoder)):
        randomize_norms(m, 1510 + i)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler)


def build_sd2v_components() -> dict:
    torch.manual_seed(2101)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16,
        attention_head_dim=[1, 2, 2, 2],
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
    )
    vae = build_vae(2102)
    torch.manual_seed(2103)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=16,
            # ids as in stabilityai/stable-diffusion-2-1 text_encoder/config.json
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    scheduler = DDIMScheduler.from_config(json.loads(SD21_SCHEDULER_JSON))
    for i, m in enumerate((unet, vae, text_encoder)):
        randomize_norms(m, 2110 + i)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler)


def save_model(name: str, comps: dict, vocab, merges, pad_token: str, scheduler_json: str, variant: str | None):
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    tmp_tok = out.parent / f".{name}-tok-tmp"
    write_tokenizer(tmp_tok, vocab, merges, pad_token)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_tok)
    shutil.rmtree(tmp_tok)
    pipe = StableDiffusionPipeline(
        vae=comps["vae"],
        text_encoder=comps["text_encoder"],
        tokenizer=tokenizer,
        unet=comps["unet"],
        scheduler=comps["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True, variant=variant)
    # Replace what save_pretrained wrote for the tokenizer and scheduler with
    # the files exactly as the hub repos ship them.
    write_tokenizer(out / "tokenizer", vocab, merges, pad_token)
    (out / "scheduler" / "scheduler_config.json").write_text(scheduler_json)
    if variant:
        # only the variant files may exist
        for p in out.rglob("*.safetensors"):
            assert p.name.endswith(f".{variant}.safetensors"), p
    del pipe


def load_pipe(name: str, variant: str | None) -> StableDiffusionPipeline:
    kw = {"variant": variant} if variant else {}
    pipe = StableDiffusionPipeline.from_pretrained(FIXTURES / name, torch_dtype=torch.float32, **kw)
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval()
        assert next(m.parameters()).dtype == torch.float32
    return pipe


# --------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------

TOKEN_PROMPTS = [
    "",
    "a photo of a cat",
    "A photo of an astronaut riding a horse on Mars",
    "  multiple   spaces\nnew line\n\ttab\t end  ",
    "UPPER CASE Words MiXeD",
    "Café déjà vu, naïve façade",
    "hello, world. it's 5:30pm & 100% done!!",
    "wow! amazing !",
    "don't won't they're I'm we've you'll she'd",
    "a cute cat 🐱🔥 with sparkles ✨",
    "猫と犬",
    "1234567 and 3.14159",
    "(masterpiece:1.2), best quality, [ugly], {detailed}, <lora:foo:0.8>",
    "a <|endoftext|> b <|startoftext|> c",
    "snake_case-words/path\\back \"quoted\" #hashtag @user $9.99",
    " ".join(["a very long prompt that keeps going"] * 14),
]


def make_token_refs(pipes: dict[str, StableDiffusionPipeline], vocab, merges) -> list[str]:
    tok15 = pipes["tiny-sd15"].tokenizer
    tok2 = pipes["tiny-sd2v"].tokenizer
    ref15 = ReferenceBPE(vocab, merges, [BOS, EOS])
    ref2 = ReferenceBPE(vocab, merges, [BOS, EOS, "!"])

    cat = tok15("a photo of a cat").input_ids
    assert cat == [49406, 320, 1125, 539, 320, 2368, 49407], cat
    assert tok15.pad_token_id == 49407 and tok2.pad_token_id == 0, (tok15.pad_token_id, tok2.pad_token_id)

    def ids(tok, p):
        return tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids

    out = []
    mismatches = []
    for p in TOKEN_PROMPTS:
        a, b = ids(tok15, p), ids(tok2, p)
        assert len(a) == len(b) == 77
        if a != ref15.encode(p, 49407) or b != ref2.encode(p, 0):
            mismatches.append(p)
        out.append({"prompt": p, "ids_sd15": a, "ids_sd2": b})
    assert any(r["ids_sd2"][76] == 49407 for r in out), "no prompt got truncated"
    with open(REFS / "tokens.json", "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    if mismatches:
        return [f"tokens: transformers CLIPTokenizer differs from the python reference BPE for {p!r}" for p in mismatches]
    print("tokens: transformers CLIPTokenizer agrees with the independent python BPE on all prompts")
    return []


def make_randn_refs() -> None:
    shapes = [(1, 4, 8, 8), (3,), (15,), (16,), (17,), (5, 7), (1, 4, 12, 8), (2, 3, 5, 5), (1, 4, 64, 64)]
    seeds = [0, 42, 1234, 2**32 + 5]
    tensors: dict[str, torch.Tensor] = {}
    meta = []
    for seed in seeds:
        for shape in shapes:
            name = f"s{seed}_" + "x".join(map(str, shape))
            g = torch.Generator("cpu").manual_seed(seed)
            tensors[name] = torch.randn(shape, generator=g, dtype=torch.float32)
            meta.append({"name": name, "seed": seed, "shape": list(shape), "position": None})
    for seed, seq in [(42, [(1, 4, 8, 8), (1, 4, 8, 8)]), (7, [(3,), (20,), (1,), (2,)])]:
        g = torch.Generator("cpu").manual_seed(seed)
        for i, shape in enumerate(seq):
            name = f"seq_s{seed}_{i}"
            tensors[name] = torch.randn(shape, generator=g, dtype=torch.float32)
            meta.append({"name": name, "seed": seed, "shape": list(shape), "position": i})
    save_file({k: v.contiguous() for k, v in tensors.items()}, REFS / "randn.safetensors")
    with open(REFS / "randn.json", "w") as f:
        json.dump(
            {
                "generator": "torch.Generator('cpu').manual_seed(seed); torch.randn(shape, generator=g) float32; "
                "entries with a position are consecutive draws on one generator",
                "tensors": meta,
            },
            f,
            indent=1,
        )


@torch.no_grad()
def make_component_refs(name: str, pipe: StableDiffusionPipeline) -> None:
    tok = pipe.tokenizer
    text_ids = tok(
        [PROMPT, ""], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(torch.int64)
    text_out = pipe.text_encoder(text_ids)[0]
    unet_sample = torch.randn((2, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(0))
    unet_timestep = torch.tensor([981.0], dtype=torch.float32)
    unet_out = pipe.unet(unet_sample, 981, encoder_hidden_states=text_out).sample
    vae_latents = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(1))
    vae_out = pipe.vae.decode(vae_latents).sample
    tensors = dict(
        text_ids=text_ids,
        text_out=text_out,
        unet_sample=unet_sample,
        unet_timestep=unet_timestep,
        unet_out=unet_out,
        vae_latents=vae_latents,
        vae_out=vae_out,
    )
    for k, v in tensors.items():
        assert torch.isfinite(v.float()).all(), (name, k)
    assert tuple(text_out.shape) == (2, 77, 16) and tuple(vae_out.shape) == (1, 3, 64, 64)
    save_file({k: v.contiguous() for k, v in tensors.items()}, REFS / f"components_{name}.safetensors")


@torch.no_grad()
def make_memory_refs(pipes: dict[str, StableDiffusionPipeline]) -> None:
    """Tiled VAE decode (diffusers' enable_tiling) on latents spanning 4x5 tiles of the tiny
    VAE (tile: sample_size 64 px = 8 latents, overlap 25%), and the untiled decode."""
    vae = pipes["tiny-sd15"].vae
    z = torch.randn((1, 4, 20, 28), generator=torch.Generator("cpu").manual_seed(3))
    full = vae.decode(z).sample
    vae.enable_tiling()
    tiled = vae.decode(z).sample
    vae.disable_tiling()
    assert tuple(tiled.shape) == (1, 3, 160, 224) and not torch.equal(full, tiled)
    save_file(dict(latents=z, full=full.contiguous(), tiled=tiled.contiguous()),
              REFS / "vae_tiling_tiny-sd15.safetensors")


def make_scheduler(sched_name: str, cfg):
    if sched_name == "euler":
        return EulerDiscreteScheduler.from_config(cfg)
    if sched_name == "euler-a":
        return EulerAncestralDiscreteScheduler.from_config(cfg)
    if sched_name == "ddim":
        return DDIMScheduler.from_config(cfg)
    if sched_name == "dpm++2m":
        return DPMSolverMultistepScheduler.from_config(cfg)
    if sched_name == "dpm++2m-karras":
        return DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True)
    if sched_name == "pndm":
        return PNDMScheduler.from_config(cfg)
    if sched_name == "heun":
        return HeunDiscreteScheduler.from_config(cfg)
    if sched_name == "lms":
        return LMSDiscreteScheduler.from_config(cfg)
    if sched_name == "lms-karras":
        return LMSDiscreteScheduler.from_config(cfg, use_karras_sigmas=True)
    if sched_name == "dpm2":
        return KDPM2DiscreteScheduler.from_config(cfg)
    if sched_name == "dpm2-a":
        return KDPM2AncestralDiscreteScheduler.from_config(cfg)
    if sched_name == "dpm++2m-sde":
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="sde-dpmsolver++")
    if sched_name == "dpm++2m-sde-karras":
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    if sched_name == "unipc":
        return UniPCMultistepScheduler.from_config(cfg)
    if sched_name == "ddpm":
        return DDPMScheduler.from_config(cfg)
    if sched_name == "lcm":
        return LCMScheduler.from_config(cfg)
    raise ValueError(sched_name)


def _floats(t) -> list[float]:
    if isinstance(t, torch.Tensor):
        return [float(x) for x in t.detach().cpu().double().tolist()]
    return [float(x) for x in np.asarray(t, dtype=np.float64).tolist()]


def _finite_json(x):
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_json(v) for v in x]
    return x


def make_scheduler_refs(pipes: dict[str, StableDiffusionPipeline]) -> None:
    out = []
    for model, pipe in pipes.items():
        cfg = pipe.scheduler.config
        for sched_name in ALL_SCHEDULERS:
            for steps in (8, 20):
                s = make_scheduler(sched_name, cfg)
                s.set_timesteps(steps, device="cpu")
                sigmas = getattr(s, "sigmas", None)
                out.append(
                    {
                        "model": model,
                        "scheduler": sched_name,
                        "class": type(s).__name__,
                        "steps": steps,
                        "timesteps": _floats(s.timesteps),
                        "timesteps_dtype": str(s.timesteps.dtype).replace("torch.", ""),
                        "sigmas": _floats(sigmas) if sigmas is not None else None,
                        "init_noise_sigma": float(s.init_noise_sigma),
                        "timestep_spacing": s.config.get("timestep_spacing"),
                        "prediction_type": s.config.get("prediction_type"),
                        "steps_offset": s.config.get("steps_offset"),
                        # full effective config of the scheduler built by from_config
                        "config": {k: v for k, v in s.config.items() if not k.startswith("_")},
                    }
                )
    with open(REFS / "schedulers.json", "w") as f:
        # Strict JSON: non-finite config values (e.g. lambda_min_clipped = -inf) as strings.
        json.dump(_finite_json(out), f, indent=1, allow_nan=False)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (img * 255).round().astype(np.uint8)


def pipeline_cases() -> list[dict]:
    cases = []

    def add(model, sched, steps, seeds, guidance=7.5, negative=NEGATIVE, width=64, height=64, init=False, tag="",
            spacing=None):
        name = f"{model}_{sched}_{steps}st_{width}x{height}_g{guidance:g}" + (
            "_init" if init else "_seeds" + "-".join(map(str, seeds))
        ) + tag + (f"_{spacing}" if spacing else "")
        cases.append(
            dict(
                name=name,
                model=model,
                scheduler=sched,
                steps=steps,
                guidance=guidance,
                prompt=PROMPT,
                negative_prompt=negative,
                width=width,
                height=height,
                seeds=list(seeds),
                init_latents="refs/latents_64x64.safetensors" if init else None,
                timestep_spacing=spacing,
            )
        )

    for model in ("tiny-sd15", "tiny-sd2v"):
        for sched in SCHEDULER_NAMES:
            add(model, sched, 8, [42, 43])
    for sched in SCHEDULER_NAMES:
        add("tiny-sd15", sched, 8, [0], init=True)
    add("tiny-sd15", "euler-a", 20, [5])
    add("tiny-sd15", "dpm++2m-karras", 20, [5])
    add("tiny-sd15", "euler-a", 8, [7], width=96, height=64)
    add("tiny-sd15", "euler", 8, [9], guidance=1.0, negative="")
    add("tiny-sd2v", "dpm++2m", 20, [11], width=64, height=96)
    # The rest of the scheduler set: both models, 8 steps (two seeds) and 20 steps (one).
    for model in ("tiny-sd15", "tiny-sd2v"):
        for sched in MORE_SCHEDULERS:
            add(model, sched, 8, [42, 43])
            add(model, sched, 20, [21])
        for sched in SCHEDULER_NAMES:
            add(model, sched, 20, [21])
    # Few-step set-ups: SD-Turbo style (Euler a, trailing spacing, no guidance) and LCM.
    add("tiny-sd2v", "euler-a", 1, [3], guidance=0.0, negative="", spacing="trailing")
    add("tiny-sd2v", "euler-a", 4, [3], guidance=0.0, negative="", spacing="trailing")
    add("tiny-sd15", "lcm", 4, [4], guidance=1.0, negative="")
    add("tiny-sd15", "ddim", 4, [4], guidance=0.0, negative="", spacing="trailing")
    return cases


@torch.no_grad()
def make_pipeline_refs(pipes: dict[str, StableDiffusionPipeline]) -> list[str]:
    img_dir = REFS / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    init_latents = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(100))
    save_file({"latents": init_latents.contiguous()}, REFS / "latents_64x64.safetensors")
    problems = []
    cases = pipeline_cases()
    for case in cases:
        pipe = pipes[case["model"]]
        base_cfg = pipe.scheduler.config
        pipe_scheduler = pipe.scheduler
        pipe.scheduler = make_scheduler(case["scheduler"], base_cfg)
        if case.get("timestep_spacing"):
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing=case["timestep_spacing"])
        try:
            gens = [torch.Generator("cpu").manual_seed(s) for s in case["seeds"]]
            kwargs = dict(
                negative_prompt=case["negative_prompt"],
                num_inference_steps=case["steps"],
                guidance_scale=case["guidance"],
                width=case["width"],
                height=case["height"],
                num_images_per_prompt=len(case["seeds"]),
                generator=gens,
                output_type="np",
            )
            if case["init_latents"]:
                kwargs["latents"] = init_latents.clone()
            images = pipe(case["prompt"], **kwargs).images
        finally:
            pipe.scheduler = pipe_scheduler
        assert images.shape == (len(case["seeds"]), case["height"], case["width"], 3), images.shape
        if not np.isfinite(images).all():
            problems.append(f"{case['name']}: NaN/inf in image")
        paths = []
        for seed, img in zip(case["seeds"], images):
            u8 = to_uint8(img)
            if u8.min() == u8.max() or len(np.unique(u8.reshape(-1, 3), axis=0)) < 2:
                problems.append(f"{case['name']} seed {seed}: image is a single colour")
            rel = f"refs/images/{case['name']}_seed{seed}.png"
            Image.fromarray(u8).save(FIXTURES / rel, optimize=True)
            paths.append(rel)
        case["images"] = paths
        print(f"  case {case['name']}: {len(paths)} image(s), mean {images.mean():.4f} std {images.std():.4f}")
    with open(REFS / "cases.json", "w") as f:
        json.dump(cases, f, indent=1)
    return problems


@torch.no_grad()
def make_minimal_scheduler_refs(pipes: dict[str, StableDiffusionPipeline]) -> None:
    """Every sampler built from MINIMAL_SCHEDULER_JSON as a diffusers user runs it: the
    pipeline constructed with the scheduler loaded from the folder (StableDiffusionPipeline
    rewrites steps_offset to 1 and clip_sample to False on it), used as it is for its own
    class (DDIM), and ``X.from_config(pipe.scheduler.config)`` for every other sampler
    (keys the file lacks take X's defaults: DDPM clips, PNDM runs its Runge-Kutta warm-up).
    On tiny-sd15 at 13 steps (a count that does not divide 1000) and at 8."""
    cfg_dir = FIXTURES / "minimal-scheduler"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / "scheduler_config.json").write_text(MINIMAL_SCHEDULER_JSON)
    loaded = DDIMScheduler.from_pretrained(cfg_dir)
    pipe = StableDiffusionPipeline(**{**pipes["tiny-sd15"].components, "scheduler": loaded})
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.clip_sample is False and pipe.scheduler.config.steps_offset == 1
    saved = pipe.scheduler
    img_dir = REFS / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    try:
        for sched in ALL_SCHEDULERS:
            for steps in (13, 8):
                pipe.scheduler = saved if sched == "ddim" else make_scheduler(sched, saved.config)
                seeds = [31]
                images = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                              width=64, height=64, num_images_per_prompt=1,
                              generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                              output_type="np").images
                name = f"minsched_{sched}_{steps}st"
                rel = f"refs/images/{name}_seed{seeds[0]}.png"
                Image.fromarray(to_uint8(images[0])).save(FIXTURES / rel, optimize=True)
                conf = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
                cases.append(dict(name=name, model="tiny-sd15", scheduler=sched, steps=steps, guidance=7.5,
                                  prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, seeds=seeds,
                                  init_latents=None, timestep_spacing=None, images=[rel],
                                  scheduler_config="minimal-scheduler/scheduler_config.json",
                                  timesteps=_floats(pipe.scheduler.timesteps), config=_finite_json(conf)))
                print(f"  minimal-config {name}: mean {images.mean():.4f}")
    finally:
        pipe.scheduler = saved
    # The same minimal file naming PNDM (SD 1.x's class): PNDM is now the pipeline's own
    # (Runge-Kutta warm-up, steps_offset 1) and DDIM comes from from_config (clips x0).
    pndm_dir = FIXTURES / "minimal-scheduler-pndm"
    pndm_dir.mkdir(parents=True, exist_ok=True)
    (pndm_dir / "scheduler_config.json").write_text(MINIMAL_SCHEDULER_JSON.replace("DDIMScheduler", "PNDMScheduler"))
    pipe2 = StableDiffusionPipeline(**{**pipes["tiny-sd15"].components,
                                       "scheduler": PNDMScheduler.from_pretrained(pndm_dir)})
    pipe2.set_progress_bar_config(disable=True)
    own = pipe2.scheduler
    for sched in ("pndm", "ddim"):
        pipe2.scheduler = own if sched == "pndm" else make_scheduler(sched, own.config)
        images = pipe2(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=13, guidance_scale=7.5,
                       width=64, height=64, generator=[torch.Generator("cpu").manual_seed(31)],
                       output_type="np").images
        name = f"minsched-pndm_{sched}_13st"
        rel = f"refs/images/{name}_seed31.png"
        Image.fromarray(to_uint8(images[0])).save(FIXTURES / rel, optimize=True)
        conf = {k: v for k, v in pipe2.scheduler.config.items() if not k.startswith("_")}
        cases.append(dict(name=name, model="tiny-sd15", scheduler=sched, steps=13, guidance=7.5,
                          prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, seeds=[31],
                          init_latents=None, timestep_spacing=None, images=[rel],
                          scheduler_config="minimal-scheduler-pndm/scheduler_config.json",
                          timesteps=_floats(pipe2.scheduler.timesteps), config=_finite_json(conf)))
        print(f"  minimal-config {name}: mean {images.mean():.4f} clip {conf.get('clip_sample')}")
    with open(REFS / "minimal_scheduler_cases.json", "w") as f:
        json.dump(cases, f, indent=1)


# --------------------------------------------------------------------------
# SDXL: a tiny random StableDiffusionXLPipeline in the diffusers layout, its UNet following
# the conventions real checkpoints follow (64-wide attention heads, 32 normalisation
# groups; the text encoders are narrower than that to stay small: their token embeddings
# alone are 49408 rows), and diffusers' outputs for it.
# --------------------------------------------------------------------------

SDXL_SCHEDULER_JSON = """{
  "_class_name": "EulerDiscreteScheduler",
  "_diffusers_version": "0.19.0.dev0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "clip_sample": false,
  "interpolation_type": "linear",
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "sample_max_value": 1.0,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "timestep_spacing": "leading",
  "trained_betas": null,
  "use_karras_sigmas": false
}
"""


def build_sdxl_components() -> dict:
    torch.manual_seed(3001)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 1),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=16 + 32,
        norm_num_groups=32,
    )
    vae = build_vae(3002)
    vae.register_to_config(scaling_factor=0.13025)
    torch.manual_seed(3003)
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        hidden_act="quick_gelu", projection_dim=16, pad_token_id=49407, **common))
    torch.manual_seed(3004)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=1,
        hidden_act="gelu", projection_dim=32, pad_token_id=1, **common))
    scheduler = EulerDiscreteScheduler.from_config(json.loads(SDXL_SCHEDULER_JSON))
    for i, m in enumerate((unet, vae, text_encoder, text_encoder_2)):
        randomize_norms(m, 3010 + i)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, scheduler=scheduler)


def save_sdxl(name: str) -> None:
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    comps = build_sdxl_components()
    tok = CLIPTokenizer.from_pretrained(FIXTURES / "tiny-sd15" / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(FIXTURES / "tiny-sd2v" / "tokenizer")
    pipe = StableDiffusionXLPipeline(tokenizer=tok, tokenizer_2=tok2, force_zeros_for_empty_prompt=True, **comps)
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    # The tokenizer files exactly as the hub repos ship them (SDXL's tokenizer_2 pads with "!").
    for sub, src in (("tokenizer", "tiny-sd15"), ("tokenizer_2", "tiny-sd2v")):
        shutil.rmtree(out / sub)
        shutil.copytree(FIXTURES / src / "tokenizer", out / sub)
    (out / "scheduler" / "scheduler_config.json").write_text(SDXL_SCHEDULER_JSON)


def load_sdxl(name: str) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(FIXTURES / name, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_single_file_sdxl(pipe: StableDiffusionXLPipeline) -> None:
    """tiny-sdxl as one file in the original SGM layout, as SDXL checkpoints (and their
    fine-tunes) ship: model.diffusion_model.* with label_emb, conditioner.embedders.0 (CLIP-L,
    transformers names), conditioner.embedders.1.model (OpenCLIP: packed q/k/v, ln_final,
    text_projection as x @ P), first_stage_model.*; checked by loading it back with
    diffusers' own from_single_file."""
    sd = _orig_unet_and_vae(pipe)
    for k, v in pipe.text_encoder.state_dict().items():
        # transformers >= 5.6 saves CLIPTextModel without its `text_model.` level; checkpoints have it
        k = k if k.startswith("text_model.") else "text_model." + k
        sd["conditioner.embedders.0.transformer." + k] = v
    te2 = pipe.text_encoder_2.state_dict()
    P = "conditioner.embedders.1.model."
    sd[P + "token_embedding.weight"] = te2["text_model.embeddings.token_embedding.weight"]
    sd[P + "positional_embedding"] = te2["text_model.embeddings.position_embedding.weight"]
    for i in range(pipe.text_encoder_2.config.num_hidden_layers):
        p, q = f"text_model.encoder.layers.{i}.", f"{P}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            sd[q + f"attn.in_proj_{kind}"] = torch.cat([te2[p + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
            for a, b in (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."),
                         ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")):
                sd[q + b + kind] = te2[p + a + kind]
    sd[P + "ln_final.weight"] = te2["text_model.final_layer_norm.weight"]
    sd[P + "ln_final.bias"] = te2["text_model.final_layer_norm.bias"]
    sd[P + "text_projection"] = te2["text_projection.weight"].T
    sd[P + "logit_scale"] = torch.tensor(4.6052)
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    out = FIXTURES / "single"
    out.mkdir(exist_ok=True)
    path = out / "tiny-sdxl.safetensors"
    save_file(sd, path)
    back = StableDiffusionXLPipeline.from_single_file(str(path), config=str(FIXTURES / "tiny-sdxl"),
                                                      torch_dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ref, got = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        missing = set(ref) - set(got)
        assert not missing, f"{name}: {sorted(missing)[:5]}"
        for k in ref:
            assert torch.equal(ref[k].float(), got[k].float().reshape(ref[k].shape)), f"{name}.{k} differs"
    print(f"  single file {path.name}: {len(sd)} tensors, loaded back identically by from_single_file")


def save_images(name: str, seeds: list[int], images: np.ndarray) -> list[str]:
    """Writes a case's images as refs/images/NAME_seedS.png; returns their paths."""
    paths = []
    for seed, img in zip(seeds, images):
        rel = f"refs/images/{name}_seed{seed}.png"
        Image.fromarray(to_uint8(img)).save(FIXTURES / rel, optimize=True)
        paths.append(rel)
    return paths


SDXL_SCHEDULERS = ["euler", "euler-a", "dpm++2m-karras", "ddim"]


@torch.no_grad()
def make_sdxl_refs() -> None:
    save_sdxl("tiny-sdxl")
    pipe = load_sdxl("tiny-sdxl")
    make_single_file_sdxl(pipe)
    make_sdxl_prompt_refs()
    # Components: both encoders' penultimate hidden states and the pooled projection, the
    # UNet with its added conditions.
    ids1 = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids
    ids2 = pipe.tokenizer_2([PROMPT, ""], padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
    o1 = pipe.text_encoder(ids1, output_hidden_states=True)
    o2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
    context = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    sample = torch.randn((2, 4, 8, 12), generator=torch.Generator("cpu").manual_seed(0))
    time_ids = torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0], [128.0, 128.0, 16.0, 8.0, 64.0, 96.0]])
    unet_out = pipe.unet(sample, 781, encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": o2.text_embeds, "time_ids": time_ids}).sample
    tensors = dict(ids1=ids1.to(torch.int64), ids2=ids2.to(torch.int64), hidden1=o1.hidden_states[-2],
                   hidden2=o2.hidden_states[-2], pooled=o2.text_embeds, unet_sample=sample,
                   unet_time_ids=time_ids, unet_out=unet_out)
    for k, v in tensors.items():
        assert torch.isfinite(v.float()).all(), k
    save_file({k: v.contiguous() for k, v in tensors.items()}, REFS / "components_tiny-sdxl.safetensors")

    init_latents = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(100))
    cases = []

    def add(sched, steps, seeds, guidance=5.0, negative=NEGATIVE, width=64, height=64, spacing=None,
            init=False):
        name = (f"sdxl_{sched}_{steps}st_{width}x{height}_g{guidance:g}_" + "-".join(map(str, seeds))
                + ("_noneg" if not negative else "") + (f"_{spacing}" if spacing else "") + ("_init" if init else ""))
        cases.append(dict(name=name, model="tiny-sdxl", scheduler=sched, steps=steps, guidance=guidance,
                          prompt=PROMPT, negative_prompt=negative, width=width, height=height, seeds=seeds,
                          timestep_spacing=spacing,
                          init_latents="refs/latents_64x64.safetensors" if init else None))

    for sched in SDXL_SCHEDULERS:
        add(sched, 8, [42, 43])
    add("euler", 8, [7], width=96, height=64)
    add("dpm++2m-karras", 8, [8], negative="")  # force_zeros_for_empty_prompt
    add("euler-a", 1, [3], guidance=0.0, negative="", spacing="trailing")  # SDXL-Turbo style
    add("euler", 8, [0], init=True)
    own = pipe.scheduler
    img_dir = REFS / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for case in cases:
        sched = make_scheduler(case["scheduler"], own.config)
        if case["timestep_spacing"]:
            sched = type(sched).from_config(sched.config, timestep_spacing=case["timestep_spacing"])
        pipe.scheduler = sched
        kwargs = dict(negative_prompt=case["negative_prompt"] or None, num_inference_steps=case["steps"],
                      guidance_scale=case["guidance"], width=case["width"], height=case["height"],
                      num_images_per_prompt=len(case["seeds"]),
                      generator=[torch.Generator("cpu").manual_seed(s) for s in case["seeds"]], output_type="np")
        if case["init_latents"]:
            kwargs["latents"] = init_latents.clone()
        images = pipe(case["prompt"], **kwargs).images
        assert np.isfinite(images).all(), case["name"]
        case["images"] = save_images(case["name"], case["seeds"], images)
        print(f"  sdxl case {case['name']}: mean {images.mean():.4f} std {images.std():.4f}")
    pipe.scheduler = own
    with open(REFS / "sdxl_cases.json", "w") as f:
        json.dump(cases, f, indent=1)

    # img2img (StableDiffusionXLImg2ImgPipeline on the base model: no aesthetic score).
    from diffusers import StableDiffusionXLImg2ImgPipeline
    i2i = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    cases = []
    for sched, strength, seeds in (("euler", 0.6, [42, 43]), ("dpm++2m-karras", 0.8, [5])):
        i2i.scheduler = make_scheduler(sched, own.config)
        images = i2i(PROMPT, image=Image.open(REFS / "init_64x64.png"), strength=strength,
                     negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0,
                     num_images_per_prompt=len(seeds),
                     generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np").images
        name = f"img2img_tiny-sdxl_{sched}_s{strength:g}"
        paths = save_images(name, seeds, images)
        cases.append(dict(name=name, model="tiny-sdxl", scheduler=sched, steps=10, guidance=5.0, prompt=PROMPT,
                          negative_prompt=NEGATIVE, width=64, height=64, seeds=seeds, strength=strength,
                          init_image="refs/init_64x64.png", images=paths))
        print(f"  sdxl img2img {name}: mean {images.mean():.4f}")
    i2i.scheduler = own
    with open(REFS / "sdxl_img2img_cases.json", "w") as f:
        json.dump(cases, f, indent=1)

    # Inpainting with the ordinary 4-channel UNet (StableDiffusionXLInpaintPipeline blends
    # the known region back after every step).
    from diffusers import StableDiffusionXLInpaintPipeline
    inp = StableDiffusionXLInpaintPipeline(**pipe.components)
    inp.set_progress_bar_config(disable=True)
    cases = []
    for sched, strength, seeds in (("euler-a", 1.0, [42, 43]), ("ddim", 0.7, [42])):
        inp.scheduler = make_scheduler(sched, own.config)
        images = inp(PROMPT, image=Image.open(REFS / "init_64x64.png"), mask_image=Image.open(REFS / "mask_64x64.png"),
                     strength=strength, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=5.0,
                     height=64, width=64, num_images_per_prompt=len(seeds),
                     generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np").images
        name = f"inpaint_tiny-sdxl_{sched}_s{strength:g}"
        paths = save_images(name, seeds, images)
        cases.append(dict(name=name, model="tiny-sdxl", scheduler=sched, steps=8, guidance=5.0, prompt=PROMPT,
                          negative_prompt=NEGATIVE, width=64, height=64, seeds=seeds, strength=strength,
                          init_image="refs/init_64x64.png", mask="refs/mask_64x64.png", images=paths))
        print(f"  sdxl inpaint {name}: mean {images.mean():.4f}")
    inp.scheduler = own
    with open(REFS / "sdxl_inpaint_cases.json", "w") as f:
        json.dump(cases, f, indent=1)


# --------------------------------------------------------------------------
# A1111 prompt syntax: a second, independent implementation in Python of the semantics
# of AUTOMATIC1111's prompt parser and CLIP chunking ("Original" emphasis), used to make
# reference conditioning tensors with transformers' CLIP.
# --------------------------------------------------------------------------

A1111_PROMPTS = [
    ("plain prompt with no syntax", 1),
    ("a (red:1.5) car on a [foggy] road, ((masterpiece))", 1),
    ("(unbalanced bracket, best quality", 1),
    ("first part BREAK second part", 1),
    (", ".join(f"word{i} thing" for i in range(40)), 1),  # > 75 tokens: two chunks with comma backtrack
    ("a cat (sitting:0.7) on a mat", 2),  # clip skip 2
    ("", 1),
]

_ATTN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def a1111_parse(text: str) -> list[list]:
    pieces, rounds, squares = [], [], []

    def scale(start, m):
        for p in pieces[start:]:
            p[1] *= m

    for m in _ATTN.finditer(text):
        tok, w = m.group(0), m.group(1)
        if tok.startswith("\\"):
            pieces.append([tok[1:], 1.0])
        elif tok == "(":
            rounds.append(len(pieces))
        elif tok == "[":
            squares.append(len(pieces))
        elif w is not None and rounds:
            scale(rounds.pop(), float(w))
        elif tok == ")" and rounds:
            scale(rounds.pop(), 1.1)
        elif tok == "]" and squares:
            scale(squares.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    pieces.append(["BREAK", -1])
                pieces.append([part, 1.0])
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    if not pieces:
        pieces = [["", 1.0]]
    out = [pieces[0]]
    for p in pieces[1:]:
        if p[1] == out[-1][1]:
            out[-1][0] += p[0]
        else:
            out.append(p)
    return out


def a1111_chunks(tokenizer, text: str, pad_id: int) -> list[tuple[list[int], list[float]]]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.get_vocab()[",</w>"]
    chunks, ids, ws = [], [], []
    last_comma = -1

    def close():
        nonlocal ids, ws, last_comma
        body = ids + [eos] + [pad_id] * (75 - len(ids))
        chunks.append(([bos] + body, [1.0] + ws + [1.0] * (76 - len(ws))))
        ids, ws, last_comma = [], [], -1

    for text_part, weight in a1111_parse(text):
        if weight == -1 and text_part == "BREAK":
            close()
            continue
        for t in tokenizer(text_part, add_special_tokens=False, truncation=False)["input_ids"]:
            if t == comma:
                last_comma = len(ids)
            elif len(ids) == 75 and last_comma != -1 and 75 - last_comma <= 20:
                moved_ids, moved_ws = ids[last_comma + 1 :], ws[last_comma + 1 :]
                ids, ws = ids[: last_comma + 1], ws[: last_comma + 1]
                close()
                ids, ws = moved_ids, moved_ws
            if len(ids) == 75:
                close()
            ids.append(t)
            ws.append(weight)
    if ids or not chunks:
        close()
    return chunks


@torch.no_grad()
def make_prompt_refs(pipes: dict[str, StableDiffusionPipeline]) -> None:
    tensors, meta = {}, []
    for model, pipe in pipes.items():
        te = pipe.text_encoder
        pad_id = pipe.tokenizer.pad_token_id
        for i, (prompt, clip_skip) in enumerate(A1111_PROMPTS):
            zs, all_ids, all_ws = [], [], []
            for ids, ws in a1111_chunks(pipe.tokenizer, prompt, pad_id):
                out = te(torch.tensor([ids]), output_hidden_states=True)
                if clip_skip > 1:
                    z = te.final_layer_norm(out.hidden_states[-clip_skip])
                else:
                    z = out.last_hidden_state
                w = torch.tensor([ws])
                before = z.mean()
                z = z * w.unsqueeze(-1)
                z = z * (before / z.mean())
                zs.append(z)
                all_ids.append(ids)
                all_ws.append(ws)
            name = f"{model}_{i}"
            tensors[f"{name}_ids"] = torch.tensor(all_ids, dtype=torch.int64)
            tensors[f"{name}_weights"] = torch.tensor(all_ws, dtype=torch.float32)
            tensors[f"{name}_cond"] = torch.cat(zs, dim=1).contiguous()
            meta.append({"name": name, "model": model, "prompt": prompt, "clip_skip": clip_skip, "chunks": len(all_ids)})
    save_file(tensors, REFS / "prompts.safetensors")
    with open(REFS / "prompts.json", "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)


@torch.no_grad()
def make_sdxl_prompt_refs() -> None:
    """A1111's SDXL conditioning, by the same independent parser and chunker: each encoder
    chunks the prompt with its own tokenizer (CLIP-L pads with the end token, bigG with
    "!"), each chunk's penultimate hidden state (no final layer norm) is weighted with
    mean restoration per encoder, the two are concatenated, and the pooled bigG embedding
    comes from the first chunk."""
    pipe = load_sdxl("tiny-sdxl")
    encoders = ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
    tensors, meta = {}, []
    for i, (prompt, clip_skip) in enumerate(A1111_PROMPTS):
        if clip_skip != 1:
            continue  # A1111 keeps SDXL on the penultimate layers
        per_encoder, pooled = [], None
        for tok, te in encoders:
            zs = []
            for j, (ids, ws) in enumerate(a1111_chunks(tok, prompt, tok.pad_token_id)):
                out = te(torch.tensor([ids]), output_hidden_states=True)
                z = out.hidden_states[-2]
                before = z.mean()
                z = z * torch.tensor([ws]).unsqueeze(-1)
                z = z * (before / z.mean())
                zs.append(z)
                if j == 0 and hasattr(out, "text_embeds"):
                    pooled = out.text_embeds
            per_encoder.append(torch.cat(zs, dim=1))
        assert per_encoder[0].shape[1] == per_encoder[1].shape[1], prompt
        name = f"tiny-sdxl_{i}"
        tensors[f"{name}_cond"] = torch.cat(per_encoder, dim=-1).contiguous()
        tensors[f"{name}_pooled"] = pooled.contiguous()
        meta.append({"name": name, "model": "tiny-sdxl", "prompt": prompt, "chunks": per_encoder[0].shape[1] // 77})
    save_file(tensors, REFS / "prompts_sdxl.safetensors")
    with open(REFS / "prompts_sdxl.json", "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)


# --------------------------------------------------------------------------
# img2img: StableDiffusionImg2ImgPipeline from the same components
# --------------------------------------------------------------------------

IMG2IMG_SCHEDULERS = ["euler-a", "ddim", "dpm++2m-karras", "heun", "pndm", "lms"]


def init_picture(w: int, h: int) -> np.ndarray:
    """A deterministic picture with structure (gradients and a disc), uint8 HxWx3."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / (w - 1)
    g = 255 * y / (h - 1)
    b = np.where((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 3) ** 2, 230.0, 40.0)
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


@torch.no_grad()
def make_img2img_refs(pipes: dict[str, StableDiffusionPipeline]) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    img_dir = REFS / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    pic = init_picture(64, 64)
    Image.fromarray(pic).save(REFS / "init_64x64.png")
    cases = []
    for model, strength, seeds in (("tiny-sd15", 0.6, [42, 43]), ("tiny-sd2v", 0.8, [5])):
        base = pipes[model]
        pipe = StableDiffusionImg2ImgPipeline(**base.components)
        pipe.set_progress_bar_config(disable=True)
        for sched in IMG2IMG_SCHEDULERS:
            pipe.scheduler = make_scheduler(sched, base.scheduler.config)
            images = pipe(
                PROMPT,
                image=Image.open(REFS / "init_64x64.png"),
                strength=strength,
                negative_prompt=NEGATIVE,
                num_inference_steps=10,
                guidance_scale=7.5,
                num_images_per_prompt=len(seeds),
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                output_type="np",
            ).images
            name = f"img2img_{model}_{sched}_s{strength:g}"
            paths = []
            for seed, img in zip(seeds, images):
                rel = f"refs/images/{name}_seed{seed}.png"
                Image.fromarray(to_uint8(img)).save(FIXTURES / rel, optimize=True)
                paths.append(rel)
            cases.append(dict(name=name, model=model, scheduler=sched, steps=10, guidance=7.5, prompt=PROMPT,
                              negative_prompt=NEGATIVE, width=64, height=64, seeds=seeds, strength=strength,
                              init_image="refs/init_64x64.png", images=paths))
            print(f"  img2img {name}: mean {images.mean():.4f}")
    with open(REFS / "img2img_cases.json", "w") as f:
        json.dump(cases, f, indent=1)


# --------------------------------------------------------------------------
# Inpainting: a 9-channel tiny inpainting model, and StableDiffusionInpaintPipeline
# references for it and for the ordinary tiny-sd15 (diffusers' legacy blending)
# --------------------------------------------------------------------------


def make_inpaint_model() -> Path:
    """A 9-channel inpainting UNet. Only the UNet is committed (tiny-sd15-inpaint-unet/);
    the full model is tiny-sd15 with this UNet, assembled in a temporary folder (the Rust
    tests assemble it the same way), so the fixtures hold no second copy of the rest."""
    unet_dir = FIXTURES / "tiny-sd15-inpaint-unet"
    if unet_dir.exists():
        shutil.rmtree(unet_dir)
    torch.manual_seed(1601)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=9,
        out_channels=4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    randomize_norms(unet, 1610)
    unet.to(torch.float16).save_pretrained(unet_dir, safe_serialization=True)
    out = Path(tempfile.mkdtemp()) / "tiny-sd15-inpaint"
    shutil.copytree(FIXTURES / "tiny-sd15", out)
    shutil.rmtree(out / "unet")
    shutil.copytree(unet_dir, out / "unet")
    return out


def mask_picture(w: int, h: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[h // 8 : h * 5 // 8, w // 4 : w * 3 // 4] = 255
    return m


@torch.no_grad()
def make_inpaint_refs(pipes: dict[str, StableDiffusionPipeline]) -> None:
    from diffusers import StableDiffusionInpaintPipeline

    inpaint_dir = make_inpaint_model()
    Image.fromarray(mask_picture(64, 64)).save(REFS / "mask_64x64.png")
    if not (REFS / "init_64x64.png").exists():
        Image.fromarray(init_picture(64, 64)).save(REFS / "init_64x64.png")
    inpaint_model = StableDiffusionInpaintPipeline.from_pretrained(inpaint_dir, torch_dtype=torch.float32)
    legacy = StableDiffusionInpaintPipeline(**pipes["tiny-sd15"].components)
    cases = []
    for model, pipe in (("tiny-sd15", legacy), ("tiny-sd15-inpaint", inpaint_model)):
        pipe.set_progress_bar_config(disable=True)
        base_cfg = pipe.scheduler.config
        for sched, strength, seeds in (("euler-a", 1.0, [42, 43]), ("ddim", 0.7, [42]), ("dpm++2m-karras", 1.0, [7])):
            pipe.scheduler = make_scheduler(sched, base_cfg)
            images = pipe(
                PROMPT,
                image=Image.open(REFS / "init_64x64.png"),
                mask_image=Image.open(REFS / "mask_64x64.png"),
                strength=strength,
                negative_prompt=NEGATIVE,
                num_inference_steps=8,
                guidance_scale=7.5,
                height=64,
                width=64,
                num_images_per_prompt=len(seeds),
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                output_type="np",
            ).images
            name = f"inpaint_{model}_{sched}_s{strength:g}"
            paths = []
            for seed, img in zip(seeds, images):
                rel = f"refs/images/{name}_seed{seed}.png"
                Image.fromarray(to_uint8(img)).save(FIXTURES / rel, optimize=True)
                paths.append(rel)
            cases.append(dict(name=name, model=model, scheduler=sched, steps=8, guidance=7.5, prompt=PROMPT,
                              negative_prompt=NEGATIVE, width=64, height=64, seeds=seeds, strength=strength,
                              init_image="refs/init_64x64.png", mask="refs/mask_64x64.png", images=paths))
            print(f"  inpaint {name}: mean {images.mean():.4f}")
    with open(REFS / "inpaint_cases.json", "w") as f:
        json.dump(cases, f, indent=1)


# --------------------------------------------------------------------------
# Single-file checkpoints: tiny-sd15 written in the original SD key layout (the reverse of
# what loaders do), checked by loading it back with diffusers' from_single_file.
# --------------------------------------------------------------------------


def _orig_resnet(rest: str) -> str:
    for a, b in (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("time_emb_proj.", "emb_layers.1."),
                 ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")):
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest


def _orig_unet_key(k: str, lpb: int, n_levels: int, up_attn: list[bool] | None = None) -> str:
    per = lpb + 1
    direct = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
              "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
              "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for a, b in direct.items():
        if k.startswith(a):
            return b + k[len(a):]
    parts = k.split(".")
    if parts[0] == "down_blocks":
        lvl, kind, idx, rest = int(parts[1]), parts[2], parts[3], ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{lvl * per + int(idx) + 1}.0.{_orig_resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{lvl * per + int(idx) + 1}.1.{rest}"
        if kind == "downsamplers":
            return f"input_blocks.{(lvl + 1) * per}.0.op.{'.'.join(parts[5:])}"
    if parts[0] == "mid_block":
        kind, idx, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{0 if idx == 0 else 2}.{_orig_resnet(rest)}"
        return f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        lvl, kind, idx, rest = int(parts[1]), parts[2], parts[3], ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{lvl * per + int(idx)}.0.{_orig_resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{lvl * per + int(idx)}.1.{rest}"
        if kind == "upsamplers":
            has_attn = up_attn[lvl] if up_attn else lvl > 0  # tiny-sd15: the first up block has none
            return f"output_blocks.{lvl * per + lpb}.{2 if has_attn else 1}.{'.'.join(parts[4:])}"
    raise KeyError(k)


def _orig_vae_key(k: str, n_levels: int) -> str:
    half, rest = k.split(".", 1)
    if half not in ("encoder", "decoder"):
        return k
    def blk(r):
        return r.replace("conv_shortcut.", "nin_shortcut.")
    def att(r):
        for a, b in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
            if r.startswith(a):
                return b + r[len(a):]
        return r
    p = rest.split(".")
    if rest.startswith("mid_block.resnets."):
        return f"{half}.mid.block_{int(p[2]) + 1}.{blk('.'.join(p[3:]))}"
    if rest.startswith("mid_block.attentions.0."):
        return f"{half}.mid.attn_1.{att('.'.join(p[3:]))}"
    if rest.startswith("conv_norm_out."):
        return f"{half}.norm_out.{'.'.join(p[1:])}"
    if p[0] == "down_blocks":
        if p[2] == "resnets":
            return f"{half}.down.{p[1]}.block.{p[3]}.{blk('.'.join(p[4:]))}"
        return f"{half}.down.{p[1]}.downsample.conv.{'.'.join(p[5:])}"
    if p[0] == "up_blocks":
        i = n_levels - 1 - int(p[1])
        if p[2] == "resnets":
            return f"{half}.up.{i}.block.{p[3]}.{blk('.'.join(p[4:]))}"
        return f"{half}.up.{i}.upsample.conv.{'.'.join(p[5:])}"
    return k


def _orig_unet_and_vae(pipe: StableDiffusionPipeline) -> dict:
    """The pipeline's UNet and VAE under original-checkpoint names."""
    lpb = pipe.unet.config.layers_per_block
    n_levels = len(pipe.unet.config.block_out_channels)
    up_attn = ["CrossAttn" in t for t in pipe.unet.config.up_block_types]
    sd = {}
    for k, v in pipe.unet.state_dict().items():
        sd["model.diffusion_model." + _orig_unet_key(k, lpb, n_levels, up_attn)] = v
    vae_levels = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        if any(x in k for x in ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) and "mid_block" in k:
            v = v[:, :, None, None]  # the original VAE's attention uses 1x1 convolutions
        sd["first_stage_model." + _orig_vae_key(k, vae_levels)] = v
    return sd


def _check_unet_and_vae(pipe: StableDiffusionPipeline, path: Path) -> dict:
    """Converts the saved file's UNet and VAE back with diffusers' own converters and checks
    they equal the pipeline's; returns the file's tensors in f32."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    loaded = {k: v.float() for k, v in sorted(load_file(path).items())}
    for name, conv in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        ref = getattr(pipe, name).state_dict()
        got = conv(loaded, dict(getattr(pipe, name).config))
        assert set(got) == set(ref), f"{name}: keys differ: {sorted(set(got) ^ set(ref))[:6]}"
        for k in ref:
            assert torch.equal(ref[k].float(), got[k].reshape(ref[k].shape)), f"{name}.{k} differs after conversion"
    return loaded


@torch.no_grad()
def make_single_file_refs(pipes: dict[str, StableDiffusionPipeline]) -> None:
    pipe = pipes["tiny-sd15"]
    sd = _orig_unet_and_vae(pipe)
    for k, v in pipe.text_encoder.state_dict().items():
        sd["cond_stage_model.transformer.text_model." + k] = v
    # Things real checkpoints carry that loaders must ignore.
    sd["alphas_cumprod"] = pipe.scheduler.alphas_cumprod.clone()
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd = {k: (v.half() if v.is_floating_point() and k != "alphas_cumprod" else v).contiguous() for k, v in sd.items()}
    out = FIXTURES / "single"
    out.mkdir(exist_ok=True)
    path = out / "tiny-sd15.safetensors"
    save_file(sd, path)
    # Check the layout with diffusers' own single-file converters (UNet, VAE); the text
    # encoder is the transformers state dict under a prefix.
    loaded = _check_unet_and_vae(pipe, path)
    print(f"  single file {path.name}: {len(sd)} tensors, checked with diffusers' converters")


def make_single_file_sd2(pipes: dict[str, StableDiffusionPipeline]) -> None:
    """tiny-sd2v as an SD 2.x original checkpoint: OpenCLIP text encoder (packed q/k/v in
    ``attn.in_proj_*``, ``c_fc``/``c_proj``, ``ln_1``/``ln_2``, ``positional_embedding``)
    with one more resblock than diffusers keeps (SD 2.x conditions on the penultimate layer,
    so loaders drop the last one), plus ``text_projection`` and ``logit_scale`` (unused)."""
    pipe = pipes["tiny-sd2v"]
    sd = _orig_unet_and_vae(pipe)
    # transformers 5 names keys without the `text_model.` prefix that 4.x (and diffusers'
    # converter) use: compare without it.
    te = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    oc = "cond_stage_model.model."
    sd[oc + "token_embedding.weight"] = te["embeddings.token_embedding.weight"]
    sd[oc + "positional_embedding"] = te["embeddings.position_embedding.weight"]
    sd[oc + "ln_final.weight"] = te["final_layer_norm.weight"]
    sd[oc + "ln_final.bias"] = te["final_layer_norm.bias"]
    layers = pipe.text_encoder.config.num_hidden_layers
    g = torch.Generator("cpu").manual_seed(5)
    for i in range(layers + 1):
        p = f"encoder.layers.{i}."
        r = f"{oc}transformer.resblocks.{i}."
        if i == layers:  # the dropped last layer: random, shaped like the others
            src = {k[len("encoder.layers.0."):]: torch.randn(v.shape, generator=g)
                   for k, v in te.items() if k.startswith("encoder.layers.0.")}
        else:
            src = {k[len(p):]: v for k, v in te.items() if k.startswith(p)}
        for kind in ("weight", "bias"):
            sd[r + f"attn.in_proj_{kind}"] = torch.cat(
                [src[f"self_attn.{n}.{kind}"] for n in ("q_proj", "k_proj", "v_proj")], 0)
            sd[r + f"attn.out_proj.{kind}"] = src[f"self_attn.out_proj.{kind}"]
            sd[r + f"ln_1.{kind}"] = src[f"layer_norm1.{kind}"]
            sd[r + f"ln_2.{kind}"] = src[f"layer_norm2.{kind}"]
            sd[r + f"mlp.c_fc.{kind}"] = src[f"mlp.fc1.{kind}"]
            sd[r + f"mlp.c_proj.{kind}"] = src[f"mlp.fc2.{kind}"]
    hidden = pipe.text_encoder.config.hidden_size
    sd[oc + "text_projection"] = torch.randn((hidden, hidden), generator=g)
    sd[oc + "logit_scale"] = torch.tensor(4.6052)
    sd["alphas_cumprod"] = pipe.scheduler.alphas_cumprod.clone()
    sd = {k: (v.half() if v.is_floating_point() and k != "alphas_cumprod" else v).contiguous() for k, v in sd.items()}
    path = FIXTURES / "single" / "tiny-sd2v.safetensors"
    path.parent.mkdir(exist_ok=True)
    save_file(sd, path)
    # Check with diffusers' own converters: UNet, VAE and the OpenCLIP text encoder.
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    loaded = _check_unet_and_vae(pipe, path)
    got = {k.removeprefix("text_model."): v
           for k, v in convert_open_clip_checkpoint(pipe.text_encoder, loaded).items()}
    for k, v in te.items():
        if k in got:
            assert torch.equal(v.float(), got[k].float().reshape(v.shape)), f"text encoder {k} differs"
    missing = [k for k in te if k not in got and "position_ids" not in k]
    assert not missing, f"text encoder keys diffusers did not convert: {missing[:6]}"
    print(f"  single file {path.name}: {len(sd)} tensors, checked with diffusers' converters")


# --------------------------------------------------------------------------
# LoRAs and embeddings (issue 15): tiny random files in the layouts people download, and
# references made two independent ways: diffusers' load_lora_weights + set_adapters, and a
# hand merge W + weight * (alpha / rank) * up @ down on a copy of the weights (A1111's math).
# --------------------------------------------------------------------------

LORA_DIR = FIXTURES / "lora"
EMB_DIR = FIXTURES / "embeddings"
LORA_PROMPT = "a photo of an astronaut riding a horse"


def _lora_pair(weight: torch.Tensor, rank: int, alpha: float, gen: torch.Generator, strength: float = 0.6):
    """Random (down, up) for `weight` ([out, in] or [out, in, kh, kw]) whose product, at
    multiplier 1, is about `strength` times the weight's spread."""
    out_dim = weight.shape[0]
    down_shape = (rank,) + tuple(weight.shape[1:])
    fan_in = int(np.prod(weight.shape[1:]))
    down = torch.randn(down_shape, generator=gen) / fan_in ** 0.5
    up_shape = (out_dim, rank) + ((1, 1) if weight.dim() == 4 else ())
    sigma = float(weight.float().std()) or 0.1
    up = torch.randn(up_shape, generator=gen) * sigma * strength / rank ** 0.5 * (rank / alpha)
    return down.contiguous(), up.contiguous()


def _unet_targets(unet, convs: bool) -> list[str]:
    """Module names a LoRA (or LoCon, with `convs`) trains in the UNet."""
    out = []
    for name, m in unet.named_modules():
        leaf = name.split(".")[-1]
        if isinstance(m, torch.nn.Linear) and (
                "attentions" in name and leaf in ("to_q", "to_k", "to_v", "0", "proj", "2", "proj_in", "proj_out")):
            if leaf == "0" and not name.endswith("to_out.0"):
                continue
            if leaf == "2" and not name.endswith("ff.net.2"):
                continue
            out.append(name)
        elif isinstance(m, torch.nn.Conv2d) and (
                (leaf in ("proj_in", "proj_out") and "attentions" in name)
                or (convs and ("resnets" in name or "samplers" in name) and leaf in ("conv1", "conv2", "conv_shortcut", "conv"))):
            out.append(name)
        elif convs and isinstance(m, torch.nn.Linear) and leaf == "time_emb_proj":
            out.append(name)
    return out


def _te_targets(te) -> list[str]:
    return [n for n, m in te.named_modules() if isinstance(m, torch.nn.Linear)
            and n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")]


def _module(root, name):
    m = root
    for part in name.split("."):
        m = getattr(m, part)
    return m


def _sgm_unet_names(unet) -> dict[str, str]:
    """diffusers module name -> the original layout's name (for kohya's SDXL LoRAs)."""
    cfg = unet.config
    up_attn = ["CrossAttn" in t for t in cfg.up_block_types]
    out = {}
    for k in unet.state_dict():
        if k.endswith(".weight"):
            mod = k[: -len(".weight")]
            out[mod] = _orig_unet_key(k, cfg.layers_per_block, len(cfg.block_out_channels), up_attn)[: -len(".weight")]
    return out


def make_lora_file(pipe, path: Path, fmt: str, seed: int, unet=True, te=True, convs=False, rank=4, alpha=2.0):
    """Writes a LoRA for `pipe` in `fmt` (kohya / kohya-sgm / peft); returns the hand-merge
    recipe: list of (component, module name, down, up, alpha-or-None)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    recipe = []
    tensors = {}
    encoders = [("text_encoder", pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders.append(("text_encoder_2", pipe.text_encoder_2))
    sgm = _sgm_unet_names(pipe.unet) if fmt == "kohya-sgm" else None
    if unet:
        for name in _unet_targets(pipe.unet, convs):
            w = _module(pipe.unet, name).weight.detach()
            down, up = _lora_pair(w, rank, alpha if fmt != "peft" else rank, gen)
            if fmt == "peft":
                tensors[f"unet.{name}.lora_A.weight"] = down
                tensors[f"unet.{name}.lora_B.weight"] = up
                recipe.append(("unet", name, down, up, None))
            else:
                key = "lora_unet_" + (sgm[name] if sgm else name).replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = down
                tensors[f"{key}.lora_up.weight"] = up
                tensors[f"{key}.alpha"] = torch.tensor(alpha)
                recipe.append(("unet", name, down, up, alpha))
    if te:
        for i, (comp, enc) in enumerate(encoders):
            for name in _te_targets(enc):
                w = _module(enc, name).weight.detach()
                down, up = _lora_pair(w, rank, alpha if fmt != "peft" else rank, gen)
                if fmt == "peft":
                    tensors[f"{comp}.{name}.lora_A.weight"] = down
                    tensors[f"{comp}.{name}.lora_B.weight"] = up
                    recipe.append((comp, name, down, up, None))
                else:
                    prefix = "lora_te_" if len(encoders) == 1 else f"lora_te{i + 1}_"
                    key = prefix + name.replace(".", "_")
                    tensors[f"{key}.lora_down.weight"] = down
                    tensors[f"{key}.lora_up.weight"] = up
                    tensors[f"{key}.alpha"] = torch.tensor(alpha)
                    recipe.append((comp, name, down, up, alpha))
    path.parent.mkdir(parents=True, exist_ok=True)
    # As trainers save them: half precision.
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, path,
              metadata={"ss_network_module": "networks.lora"} if fmt != "peft" else {"format": "pt"})
    # The merge uses the stored (f16) values.
    return [(c, n, d.half().float(), u.half().float(), a) for c, n, d, u, a in recipe]


@torch.no_grad()
def hand_merged(pipe, loras: list[tuple[list, float]]):
    """A copy of `pipe` whose weights hold W + weight * (alpha / rank) * up @ down."""
    import copy
    comps = {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v for k, v in pipe.components.items()}
    for recipe, weight in loras:
        for comp, name, down, up, alpha in recipe:
            m = _module(comps[comp], name)
            m = getattr(m, "base_layer", m)  # diffusers may have wrapped it (adapters since deleted)
            rank = down.shape[0]
            scale = weight * ((alpha / rank) if alpha is not None else 1.0)
            delta = (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(m.weight.shape)
            m.weight.data += scale * delta
    out = type(pipe)(**comps)
    out.set_progress_bar_config(disable=True)
    return out


def _run(pipe, prompt, negative, seeds, steps=8, guidance=7.5, size=64):
    return pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                width=size, height=size, num_images_per_prompt=len(seeds),
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np").images


def _max_diff(a, b) -> int:
    return int(np.abs(to_uint8(a).astype(int) - to_uint8(b).astype(int)).max())


@torch.no_grad()
def make_lora_refs() -> list[str]:
    problems = []
    for d in (LORA_DIR, EMB_DIR):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    img_dir = REFS / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    sd15 = load_pipe("tiny-sd15", None)
    sd15.scheduler = make_scheduler("euler", sd15.scheduler.config)
    sdxl = load_sdxl("tiny-sdxl")
    sdxl.scheduler = make_scheduler("euler", sdxl.scheduler.config)
    recipes = {
        "kohya_locon": (sd15, make_lora_file(sd15, LORA_DIR / "kohya_locon.safetensors", "kohya", 1501, convs=True)),
        "peft": (sd15, make_lora_file(sd15, LORA_DIR / "diffusers" / "peft.safetensors", "peft", 1502)),
        "te_only": (sd15, make_lora_file(sd15, LORA_DIR / "te_only.safetensors", "kohya", 1503, unet=False,
                                         alpha=4.0)),
        "sdxl_kohya": (sdxl, make_lora_file(sdxl, LORA_DIR / "sdxl" / "sdxl_kohya.safetensors", "kohya-sgm", 1504,
                                            convs=True)),
    }
    files = {"kohya_locon": LORA_DIR / "kohya_locon.safetensors",
             "peft": LORA_DIR / "diffusers" / "peft.safetensors",
             "te_only": LORA_DIR / "te_only.safetensors",
             "sdxl_kohya": LORA_DIR / "sdxl" / "sdxl_kohya.safetensors"}

    # Embeddings: A1111/kohya (emb_params, 2 vectors), diffusers (one token key, 1 vector),
    # SDXL (clip_l + clip_g, 2 vectors).
    gen = torch.Generator("cpu").manual_seed(1510)
    w1 = sd15.text_encoder.get_input_embeddings().weight
    emb_a1111 = (torch.randn((2, w1.shape[1]), generator=gen) * float(w1.std()) * 3).contiguous()
    emb_diff = (torch.randn((w1.shape[1],), generator=gen) * float(w1.std()) * 3).contiguous()
    save_file({"emb_params": emb_a1111}, EMB_DIR / "tinyemb.safetensors")
    (EMB_DIR / "styles").mkdir()
    save_file({"<diffemb>": emb_diff}, EMB_DIR / "styles" / "diffemb.safetensors")
    xl_l = sdxl.text_encoder.get_input_embeddings().weight
    xl_g = sdxl.text_encoder_2.get_input_embeddings().weight
    emb_xl = {"clip_l": (torch.randn((2, xl_l.shape[1]), generator=gen) * float(xl_l.std()) * 3).contiguous(),
              "clip_g": (torch.randn((2, xl_g.shape[1]), generator=gen) * float(xl_g.std()) * 3).contiguous()}
    save_file(emb_xl, EMB_DIR / "tinyxl.safetensors")
    torch.save({"string_to_param": {"*": emb_diff.unsqueeze(0)}}, EMB_DIR / "pickled.pt")

    cases = []
    seeds = [42, 43]

    def record(name, model, images, loras, prompt=LORA_PROMPT, negative=NEGATIVE, **extra):
        cases.append(dict(name=name, model=model, scheduler="euler", steps=8, guidance=7.5, width=64, height=64,
                          seeds=seeds, prompt=prompt, negative_prompt=negative,
                          loras=[dict(file=str(files[n].relative_to(FIXTURES)), weight=w) for n, w in loras],
                          images=save_images(name, seeds, images), **extra))

    def with_diffusers(pipe, loras):
        names = []
        for i, (n, _) in enumerate(loras):
            pipe.load_lora_weights(str(files[n]), adapter_name=f"a{i}")
            names.append(f"a{i}")
        pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
        return names

    lora_cases = [("kohya_locon", [("kohya_locon", 1.0)]), ("kohya_locon", [("kohya_locon", 0.6)]),
                  ("kohya_locon", [("kohya_locon", -0.5)]), ("peft", [("peft", 1.0)]), ("peft", [("peft", 0.6)]),
                  ("peft", [("peft", -0.5)]), ("te_only", [("te_only", 1.0)]),
                  ("two", [("kohya_locon", 0.6), ("peft", 0.5)]),
                  ("sdxl_kohya", [("sdxl_kohya", 1.0)]), ("sdxl_kohya", [("sdxl_kohya", -0.5)])]
    plain = {"tiny-sd15": _run(sd15, LORA_PROMPT, NEGATIVE, seeds), "tiny-sdxl": _run(sdxl, LORA_PROMPT, NEGATIVE, seeds)}
    for label, loras in lora_cases:
        base = recipes[loras[0][0]][0]
        model = "tiny-sdxl" if base is sdxl else "tiny-sd15"
        merged = hand_merged(base, [(recipes[n][1], w) for n, w in loras])
        hand = _run(merged, LORA_PROMPT, NEGATIVE, seeds)
        try:
            names = with_diffusers(base, loras)
            ref = _run(base, LORA_PROMPT, NEGATIVE, seeds)
            base.delete_adapters(names)
            d = _max_diff(ref, hand)
            source = "diffusers"
            if d > 2:
                problems.append(f"lora {label} {loras}: diffusers and the hand merge differ by {d}/255")
        except Exception as e:  # a format diffusers cannot load: the hand merge is the reference
            ref, d, source = hand, None, f"hand merge (diffusers: {type(e).__name__}: {str(e)[:120]})"
        effect = _max_diff(ref, plain[model])
        if effect < 10:
            problems.append(f"lora {label} {loras}: the LoRA barely changes the image ({effect}/255)")
        name = f"lora_{label}_" + "_".join(f"{w:g}" for _, w in loras)
        record(name, model, ref, loras, reference=source, hand_vs_diffusers=d, effect=effect)
        print(f"  {name}: effect {effect}/255, diffusers vs hand {d}, reference {source[:40]}")

    # Embeddings, with diffusers' load_textual_inversion.
    def ti_case(name, model, pipe, prompt, negative, loras=()):
        merged = hand_merged(pipe, [(recipes[n][1], w) for n, w in loras]) if loras else pipe
        if model == "tiny-sdxl":
            merged.load_textual_inversion(emb_xl["clip_l"], token="tinyxl", text_encoder=merged.text_encoder,
                                          tokenizer=merged.tokenizer)
            merged.load_textual_inversion(emb_xl["clip_g"], token="tinyxl", text_encoder=merged.text_encoder_2,
                                          tokenizer=merged.tokenizer_2)
        else:
            merged.load_textual_inversion(str(EMB_DIR / "tinyemb.safetensors"), token="tinyemb")
            merged.load_textual_inversion(str(EMB_DIR / "styles" / "diffemb.safetensors"), token="diffemb")
        images = _run(merged, prompt, negative, seeds)
        effect = _max_diff(images, _run(pipe if not loras else hand_merged(pipe, [(recipes[n][1], w) for n, w in loras]),
                                        prompt.replace("tinyemb", "").replace("diffemb", "").replace("tinyxl", ""),
                                        negative.replace("tinyemb", ""), seeds))
        merged.unload_textual_inversion()
        if effect < 10:
            problems.append(f"embedding case {name}: the embedding barely changes the image ({effect}/255)")
        record(name, model, images, list(loras), prompt=prompt, negative=negative,
               embeddings_dir=str(EMB_DIR.relative_to(FIXTURES)), reference="diffusers", effect=effect)
        print(f"  {name}: effect {effect}/255")

    ti_case("ti_a1111", "tiny-sd15", sd15, "a photo of tinyemb riding a horse", NEGATIVE)
    ti_case("ti_diffusers", "tiny-sd15", sd15, "a photo of an astronaut, diffemb", NEGATIVE)
    ti_case("ti_negative", "tiny-sd15", sd15, LORA_PROMPT, "tinyemb, blurry")
    ti_case("ti_with_lora", "tiny-sd15", sd15, "a photo of tinyemb riding a horse", NEGATIVE,
            loras=[("kohya_locon", 1.0)])
    ti_case("ti_sdxl", "tiny-sdxl", sdxl, "a photo of tinyxl riding a horse", NEGATIVE)
    with open(REFS / "lora_cases.json", "w") as f:
        json.dump(cases, f, indent=1)
    # A preview beside one file, as civitai helpers save them (the studio's LoRA panel shows it).
    Image.open(FIXTURES / "refs/images/lora_kohya_locon_1_seed42.png").save(
        LORA_DIR / "kohya_locon.preview.png", optimize=True)
    for p in sorted(LORA_DIR.rglob("*.safetensors")):
        print(f"  {p.relative_to(FIXTURES)}: {p.stat().st_size / 1024:.0f} KiB")
    return problems



# --------------------------------------------------------------------------
# ControlNet: tiny random ControlNets made from the tiny UNets (diffusers folders, one A1111
# single file), StableDiffusion(XL)ControlNet(Img2Img)Pipeline references, and OpenCV Canny
# references for the built-in preprocessor.
# --------------------------------------------------------------------------

CN_DIR = FIXTURES / "controlnet"
CANNY_DIR = REFS / "canny"


def make_controlnet(unet, seed: int, embedding=(8, 8, 16, 16)):
    """ControlNetModel.from_unet, then every weight perturbed (so a loader that read the UNet's
    weights instead would fail) and the zero convolutions / hint output randomised so the
    control image visibly matters."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)  # from_unet initialises the hint CNN from the global generator
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding)
    gen = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(noise * (0.3 if "weight" in name else 0.05))
            else:
                p.add_(noise * (0.1 * float(p.std()) if p.numel() > 1 else 0.01))
    return cn.eval()


def _orig_controlnet_key(k: str, lpb: int, n_levels: int, n_blocks: int) -> str:
    """A diffusers ControlNet name in A1111's layout (without the control_model. prefix)."""
    if k.startswith("controlnet_down_blocks."):
        i, rest = k.split(".", 2)[1:]
        return f"zero_convs.{i}.0.{rest}"
    if k.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + k[len("controlnet_mid_block."):]
    if k.startswith("controlnet_cond_embedding."):
        rest = k[len("controlnet_cond_embedding."):]
        if rest.startswith("conv_in."):
            return "input_hint_block.0." + rest[len("conv_in."):]
        if rest.startswith("conv_out."):
            return f"input_hint_block.{2 * (n_blocks + 1)}." + rest[len("conv_out."):]
        j, w = rest[len("blocks."):].split(".", 1)
        return f"input_hint_block.{2 * (int(j) + 1)}.{w}"
    return _orig_unet_key(k, lpb, n_levels)


def edge_picture(w: int, h: int, kind: str) -> np.ndarray:
    """Synthetic control maps: white outlines on black."""
    y, x = np.mgrid[0:h, 0:w]
    if kind == "squares":
        on = ((x % 24 == 6) | (y % 24 == 6)) & (x > 3) & (y > 3)
    else:
        r = np.sqrt((x - w / 2) ** 2 + (y - h / 2) ** 2)
        on = np.abs(r - min(w, h) / 3) < 1.0
    return np.repeat((on * 255).astype(np.uint8)[..., None], 3, axis=-1)


def canny_inputs() -> dict[str, np.ndarray]:
    import skimage.data

    rng = np.random.default_rng(1601)
    y, x = np.mgrid[0:96, 0:96].astype(np.float64)
    pics = {
        "disc_gradient": init_picture(96, 96),
        "blocks": np.kron(rng.integers(0, 256, (12, 12, 3)), np.ones((8, 8, 1))).astype(np.uint8),
        "rings": np.repeat((127.5 + 127.5 * np.sin(np.sqrt((x - 40) ** 2 + (y - 52) ** 2) / 3))
                           .round().astype(np.uint8)[..., None], 3, axis=-1),
        "stripes": np.stack([(x * 7) % 256, (y * 5) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8),
    }
    photo = Image.fromarray(skimage.data.astronaut()).resize((160, 160), Image.LANCZOS)
    pics["astronaut"] = np.asarray(photo)
    return pics


def make_canny_refs() -> None:
    import cv2

    CANNY_DIR.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, pic in canny_inputs().items():
        Image.fromarray(pic).save(CANNY_DIR / f"{name}.png", optimize=True)
        for low, high in ((100, 200), (50, 120)):
            edges = cv2.Canny(pic, low, high)
            rel = f"refs/canny/{name}_{low}_{high}_cv2.png"
            Image.fromarray(edges).save(FIXTURES / rel, optimize=True)
            cases.append(dict(image=f"refs/canny/{name}.png", low=low, high=high, edges=rel,
                              edge_fraction=float((edges > 0).mean())))
            print(f"  canny {name} {low}/{high}: {100 * (edges > 0).mean():.1f}% edge pixels")
    with open(REFS / "canny_cases.json", "w") as f:
        json.dump(cases, f, indent=1)


@torch.no_grad()
def make_controlnet_refs() -> list[str]:
    from diffusers import (StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline,
                           StableDiffusionXLControlNetPipeline)
    from diffusers.models.controlnets import MultiControlNetModel

    problems = []
    if CN_DIR.exists():
        shutil.rmtree(CN_DIR)
    CN_DIR.mkdir(parents=True)
    (REFS / "images").mkdir(parents=True, exist_ok=True)
    sd15 = load_pipe("tiny-sd15", None)
    sched = make_scheduler("euler", sd15.scheduler.config)
    cn_a = make_controlnet(sd15.unet, 1601)
    cn_b = make_controlnet(sd15.unet, 1602)
    cn_a.save_pretrained(CN_DIR / "tiny-cn-sd15", safe_serialization=True)
    cn_b.save_pretrained(CN_DIR / "tiny-cn-sd15-b", safe_serialization=True)
    # The same weights as one A1111-layout file.
    c = sd15.unet.config
    n_blocks = 2 * (len(cn_a.config.conditioning_embedding_out_channels) - 1)
    sd = {"control_model." + _orig_controlnet_key(k, c.layers_per_block, len(c.block_out_channels), n_blocks):
          v.contiguous() for k, v in cn_a.state_dict().items()}
    save_file(sd, CN_DIR / "tiny_cn_sd15_a1111.safetensors")
    # An SDXL ControlNet (another architecture for SD 1.5, and an SDXL case).
    sdxl = load_sdxl("tiny-sdxl")
    cn_xl = make_controlnet(sdxl.unet, 1603)
    # Stored in f16 (half the size); the reference runs the same rounded weights in f32.
    cn_xl.half().save_pretrained(CN_DIR / "tiny-cn-sdxl", safe_serialization=True)
    cn_xl.float()

    for name, kind in (("squares", "squares"), ("ring", "ring")):
        Image.fromarray(edge_picture(64, 64, kind)).save(CN_DIR / f"control_{name}_64.png")
    squares = Image.open(CN_DIR / "control_squares_64.png")
    ring = Image.open(CN_DIR / "control_ring_64.png")
    init = Image.open(REFS / "init_64x64.png")
    seeds = [42, 43]
    gens = lambda: [torch.Generator("cpu").manual_seed(s) for s in seeds]
    common = dict(num_inference_steps=8, output_type="np", width=64, height=64)
    cases = []

    def record(name, pipe_kind, images, units, guidance=7.5, model="tiny-sd15", **extra):
        paths = save_images(f"cn_{name}", seeds, images)
        cases.append(dict(name=name, model=model, pipeline=pipe_kind, scheduler="euler", steps=8, guidance=guidance,
                          width=64, height=64, seeds=seeds, prompt=PROMPT, negative_prompt=NEGATIVE,
                          controlnets=units, images=paths, **extra))

    def unit(folder, image, scale=1.0, start=0.0, end=1.0):
        return dict(model=f"controlnet/{folder}", image=f"controlnet/control_{image}_64.png", scale=scale,
                    start=start, end=end)

    pipe = StableDiffusionControlNetPipeline(**sd15.components, controlnet=cn_a)
    pipe.scheduler = sched
    pipe.set_progress_bar_config(disable=True)
    plain = _run(sd15, PROMPT, NEGATIVE, seeds)
    run = lambda **kw: pipe(PROMPT, negative_prompt=NEGATIVE, generator=gens(), num_images_per_prompt=2,
                            **{**common, **kw}).images
    full = run(image=squares, guidance_scale=7.5)
    record("scale1", "txt2img", full, [unit("tiny-cn-sd15", "squares")])
    d = _max_diff(full, plain)
    print(f"  controlnet scale 1: max |Δ| vs no ControlNet {d}/255")
    if d < 40:
        problems.append(f"controlnet: the control image barely matters (max Δ {d})")
    record("scale05", "txt2img", run(image=squares, guidance_scale=7.5, controlnet_conditioning_scale=0.5),
           [unit("tiny-cn-sd15", "squares", scale=0.5)])
    record("window", "txt2img", run(image=squares, guidance_scale=7.5, control_guidance_start=0.2,
                                    control_guidance_end=0.7),
           [unit("tiny-cn-sd15", "squares", start=0.2, end=0.7)])
    record("cfg1", "txt2img", run(image=squares, guidance_scale=1.0), [unit("tiny-cn-sd15", "squares")],
           guidance=1.0)
    multi = StableDiffusionControlNetPipeline(**sd15.components, controlnet=MultiControlNetModel([cn_a, cn_b]))
    multi.scheduler = sched
    multi.set_progress_bar_config(disable=True)
    record("two", "txt2img", multi(PROMPT, negative_prompt=NEGATIVE, generator=gens(), num_images_per_prompt=2,
                                   image=[squares, ring], controlnet_conditioning_scale=[1.0, 0.6],
                                   control_guidance_start=[0.0, 0.25], control_guidance_end=[1.0, 0.9],
                                   guidance_scale=7.5, **common).images,
           [unit("tiny-cn-sd15", "squares"), unit("tiny-cn-sd15-b", "ring", scale=0.6, start=0.25, end=0.9)])
    i2i = StableDiffusionControlNetImg2ImgPipeline(**sd15.components, controlnet=cn_a)
    i2i.scheduler = sched
    i2i.set_progress_bar_config(disable=True)
    record("img2img", "img2img", i2i(PROMPT, negative_prompt=NEGATIVE, generator=gens(), num_images_per_prompt=2,
                                     image=init, control_image=squares, strength=0.6, guidance_scale=7.5,
                                     controlnet_conditioning_scale=1.0,  # this pipeline's default is 0.8
                                     **common).images,
           [unit("tiny-cn-sd15", "squares")], init_image="refs/init_64x64.png", strength=0.6)
    xl = StableDiffusionXLControlNetPipeline(**sdxl.components, controlnet=cn_xl)
    xl.scheduler = make_scheduler("euler", sdxl.scheduler.config)
    xl.set_progress_bar_config(disable=True)
    record("sdxl", "txt2img", xl(PROMPT, negative_prompt=NEGATIVE, generator=gens(), num_images_per_prompt=2,
                                 image=squares, guidance_scale=7.5, **common).images,
           [unit("tiny-cn-sdxl", "squares")], model="tiny-sdxl")
    with open(REFS / "controlnet_cases.json", "w") as f:
        json.dump(cases, f, indent=1)
    make_canny_refs()
    return problems


# --------------------------------------------------------------------------
# Hires. fix: diffusers txt2img at the base size (latents out), the latents upscaled with
# F.interpolate (bilinear, antialias off: A1111's "Latent"; nearest: "Latent (nearest)") or
# the decoded picture resized with PIL's Lanczos ("Lanczos"), then
# StableDiffusionImg2ImgPipeline at the large size from freshly seeded generators.
# --------------------------------------------------------------------------


@torch.no_grad()
def make_hires_refs() -> None:
    import torch.nn.functional as F
    from diffusers import StableDiffusionImg2ImgPipeline

    (REFS / "images").mkdir(parents=True, exist_ok=True)
    pipe = load_pipe("tiny-sd15", None)
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    seeds = [42, 43]
    gens = lambda: [torch.Generator("cpu").manual_seed(s) for s in seeds]
    cases = []
    for upscaler, strength, hires_steps in (("latent", 0.55, 10), ("latent-nearest", 0.6, None),
                                            ("lanczos", 0.5, 10)):
        lat = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.5, width=64,
                   height=64, num_images_per_prompt=2, generator=gens(), output_type="latent").images
        if upscaler == "lanczos":
            pics = pipe.image_processor.postprocess(
                pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0], output_type="pil")
            image = [p.resize((128, 128), Image.LANCZOS) for p in pics]
        else:
            mode = "bilinear" if upscaler == "latent" else "nearest"
            kw = dict(antialias=False) if mode == "bilinear" else {}
            image = F.interpolate(lat, size=(16, 16), mode=mode, **kw)
        images = i2i([PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, image=image, strength=strength,
                     num_inference_steps=hires_steps or 8, guidance_scale=7.5, num_images_per_prompt=1,
                     generator=gens(), output_type="np").images
        name = f"hires_{upscaler}"
        cases.append(dict(name=name, model="tiny-sd15", scheduler="euler", steps=8, guidance=7.5, width=64,
                          height=64, seeds=seeds, prompt=PROMPT, negative_prompt=NEGATIVE,
                          hires=dict(width=128, height=128, scale=2, strength=strength, steps=hires_steps,
                                     upscaler=upscaler),
                          images=save_images(name, seeds, images)))
        print(f"  hires {upscaler}: mean {images.mean():.4f}")
    with open(REFS / "hires_cases.json", "w") as f:
        json.dump(cases, f, indent=1)


def check_no_nan_files() -> list[str]:
    problems = []
    for p in sorted(FIXTURES.rglob("*.safetensors")):
        for k, v in load_file(p).items():
            if v.is_floating_point() and not torch.isfinite(v.float()).all():
                problems.append(f"{p.relative_to(FIXTURES)}:{k} has NaN/inf")
    return problems


def make_taesd() -> None:
    """A tiny AutoencoderTiny (TAESD layout) and diffusers' decode of fixed latents."""
    torch.manual_seed(4242)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(2, 1, 1, 1),
    ).eval()
    out_dir = FIXTURES / "tiny-taesd"
    vae.save_pretrained(out_dir, safe_serialization=True)
    vae = AutoencoderTiny.from_pretrained(out_dir).eval()
    latents = torch.randn((2, 4, 8, 12), generator=torch.Generator("cpu").manual_seed(77)) * 2.5
    with torch.no_grad():
        image = vae.decode(latents).sample
    REFS.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous(), "image": image.contiguous()}, REFS / "taesd_tiny.safetensors")
    print(f"tiny-taesd: decode {tuple(latents.shape)} -> {tuple(image.shape)}, std {image.std():.4f}")


def summary() -> None:
    total = 0
    print("\nfiles under tests/fixtures:")
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file():
            n = p.stat().st_size
            total += n
            print(f"  {n:>10}  {p.relative_to(FIXTURES)}")
    print(f"total: {total} bytes ({total / 2**20:.2f} MiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bpe", help="path to bpe_simple_vocab_16e6.txt.gz (default: the copy shipped with open_clip)")
    ap.add_argument("--only", choices=["prompts", "img2img", "inpaint", "single", "taesd", "memory", "minsched", "sdxl", "lora",
                                         "controlnet", "hires"],
                    help="only remake one set of references from the committed models")
    args = ap.parse_args()
    if args.only == "taesd":
        torch.set_num_threads(2)
        make_taesd()
        return
    if args.only == "sdxl":
        torch.set_num_threads(2)
        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        make_sdxl_refs()
        return
    if args.only == "hires":
        torch.set_num_threads(2)
        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        make_hires_refs()
        return
    if args.only == "controlnet":
        torch.set_num_threads(2)
        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        problems = make_controlnet_refs()
        for p in problems:
            print("PROBLEM: " + p)
        sys.exit(1 if problems else 0)
    if args.only == "lora":
        torch.set_num_threads(2)
        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        problems = make_lora_refs()
        for p in problems:
            print("PROBLEM: " + p)
        sys.exit(1 if problems else 0)

    torch.set_num_threads(2)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    if args.only:
        pipes = {"tiny-sd15": load_pipe("tiny-sd15", None), "tiny-sd2v": load_pipe("tiny-sd2v", "fp16")}
        {"prompts": make_prompt_refs, "img2img": make_img2img_refs, "inpaint": make_inpaint_refs,
         "single": lambda p: (make_single_file_refs(p), make_single_file_sd2(p)),
         "memory": make_memory_refs, "minsched": make_minimal_scheduler_refs}[args.only](pipes)
        return

    bpe = find_bpe(args.bpe)
    print(f"torch {torch.__version__}; using BPE file {bpe}")

    FIXTURES.mkdir(parents=True, exist_ok=True)
    if REFS.exists():
        shutil.rmtree(REFS)
    REFS.mkdir(parents=True)

    vocab, merges = build_vocab_and_merges(bpe)

    save_model("tiny-sd15", build_sd15_components(), vocab, merges, EOS, SD15_SCHEDULER_JSON, variant=None)
    save_model("tiny-sd2v", build_sd2v_components(), vocab, merges, "!", SD21_SCHEDULER_JSON, variant="fp16")

    pipes = {"tiny-sd15": load_pipe("tiny-sd15", None), "tiny-sd2v": load_pipe("tiny-sd2v", "fp16")}

    problems = make_token_refs(pipes, vocab, merges)
    make_randn_refs()
    for name, pipe in pipes.items():
        make_component_refs(name, pipe)
    make_scheduler_refs(pipes)
    make_prompt_refs(pipes)
    make_img2img_refs(pipes)
    make_inpaint_refs(pipes)
    make_single_file_refs(pipes)
    make_single_file_sd2(pipes)
    make_memory_refs(pipes)
    problems += make_pipeline_refs(pipes)
    make_minimal_scheduler_refs(pipes)
    make_sdxl_refs()
    problems += make_lora_refs()
    problems += make_controlnet_refs()
    make_hires_refs()
    make_taesd()
    problems += check_no_nan_files()

    summary()
    if problems:
        print("\nPROBLEMS:")
        for p in problems:
            print("  " + p)
        sys.exit(1)
    print("\nall sanity checks passed")


if __name__ == "__main__":
    main()
