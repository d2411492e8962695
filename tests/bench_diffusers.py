"""Side-by-side CPU benchmark: diffusers (PyTorch) and `sd-studio bench` on the same
random full-size Stable Diffusion 1.5 weights, in one run.

Real weights cannot be downloaded on our machines, and speed does not depend on weight
values, so this script builds an SD 1.5-shaped model from the published configs with random
weights (saved once, never committed), times diffusers' StableDiffusionPipeline on it, then
runs `sd-studio bench` on the same folder and prints both and their ratio.

    pip install torch diffusers transformers safetensors
    cargo build --release
    python tests/bench_diffusers.py --threads 2 --size 256 --steps 6

Reported per phase (medians over --runs after one warm-up): text encoding (prompt and
negative prompt), one denoising step (a CFG-batched UNet call plus the sampler), VAE decode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "sample_size": 512,
}
TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=768)
SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
PROMPT = "a photograph of an astronaut riding a horse"


def make_model(path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if (path / "model_index.json").exists():
        return
    print(f"making random SD 1.5-sized weights in {path} (once)", file=sys.stderr)
    torch.manual_seed(0)
    tok_dir = ROOT / "tests" / "fixtures" / "tiny-sd15" / "tokenizer"
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=UNet2DConditionModel(**UNET),
        scheduler=PNDMScheduler.from_config(SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    # The hub's SD repos ship vocab.json + merges.txt; transformers 5 saves tokenizer.json.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tok_dir / name, tmp / "tokenizer" / name)
    tmp.rename(path)


def bench_diffusers(path: Path, a) -> dict:
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    torch.set_num_threads(a.threads)
    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    enc, steps, dec = [], [], []
    for run in range(a.runs + 1):
        with torch.inference_mode():
            t0 = time.perf_counter()
            pipe.encode_prompt(PROMPT, "cpu", a.batch, True, "")
            t_enc = time.perf_counter() - t0
            marks = []

            def on_step(_p, _i, _t, kw):
                marks.append(time.perf_counter())
                return kw

            start = time.perf_counter()
            latents = pipe(PROMPT, height=a.size, width=a.size, num_inference_steps=a.steps,
                           guidance_scale=7.5, num_images_per_prompt=a.batch, output_type="latent",
                           generator=torch.Generator("cpu").manual_seed(0),
                           callback_on_step_end=on_step).images
            t0 = time.perf_counter()
            for i in range(a.batch):
                pipe.vae.decode(latents[i : i + 1] / pipe.vae.config.scaling_factor)
            t_dec = time.perf_counter() - t0
        if run == 0:
            continue
        enc.append(t_enc)
        # Step i's time: from the previous step's end (or the first step's start, which
        # includes encoding inside the pipeline call, so skip it) to this step's end.
        steps += [b - a_ for a_, b in zip(marks, marks[1:])]
        dec.append(t_dec)
    med = lambda v: sorted(v)[len(v) // 2]
    return {"text_encode_s": med(enc), "step_s": med(steps), "decode_s": med(dec)}


def bench_ours(path: Path, a) -> dict:
    exe = Path(a.sd_studio)
    if not exe.exists():
        sys.exit(f"{exe} not found: run `cargo build --release` first")
    cmd = [str(exe), "bench", "--model", str(path), "--width", str(a.size), "--height", str(a.size),
           "--steps", str(a.steps), "--batch", str(a.batch), "--runs", str(a.runs),
           "--threads", str(a.threads), "--scheduler", "dpm++2m-karras", "--guidance", "7.5"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=os.environ.get("SD_BENCH_MODEL", "/tmp/sd15-random"))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sd-studio", default=str(ROOT / "target" / "release" / "sd-studio"))
    p.add_argument("--skip-diffusers", action="store_true")
    a = p.parse_args()
    path = Path(a.model_dir)
    make_model(path)
    import diffusers
    import torch

    theirs = None if a.skip_diffusers else bench_diffusers(path, a)
    ours = bench_ours(path, a)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}; threads {a.threads}; "
          f"{a.size}x{a.size}, batch {a.batch}, CFG 7.5, DPM++ 2M Karras, {a.steps} steps, {a.runs} runs")
    print(f"{'phase':<14}{'diffusers s':>14}{'sd-studio s':>14}{'ratio':>10}")
    for k, label in [("text_encode_s", "text encode"), ("step_s", "step"), ("decode_s", "decode")]:
        t = theirs[k] if theirs else float("nan")
        print(f"{label:<14}{t:>14.3f}{ours[k]:>14.3f}{ours[k] / t if theirs else float('nan'):>10.2f}")
    print(json.dumps({"diffusers": theirs, "sd_studio": ours}))


if __name__ == "__main__":
    main()
