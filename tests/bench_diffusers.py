"""Side-by-side benchmark: diffusers (PyTorch) and `sd-studio bench` on the same random
full-size Stable Diffusion 1.5 (or, with --family sdxl, SDXL base) weights, in one run, on the
CPU (default) or a CUDA GPU.

Real weights cannot be downloaded on our machines, and speed does not depend on weight
values, so this script builds an SD 1.5-shaped model from the published configs with random
weights (saved once, never committed), plus a random full-size TAESD (diffusers'
AutoencoderTiny default config, the TAESD for SD 1.x) beside it, times diffusers'
StableDiffusionPipeline on them, then runs `sd-studio bench` on the same folders and prints
both and their ratio.

    pip install torch diffusers transformers safetensors
    cargo build --release
    python tests/bench_diffusers.py --threads 2 --size 256 --steps 6            # CPU
    python tests/bench_diffusers.py --device cuda --size 512 --steps 20 \\
        --batches 1,4,8 --grid --runs 3 --compile --out bench.json              # GPU
    (tests/gpu_bench.sh runs the GPU line on a lent GPU machine.)

Reported per batch size (medians over --runs after one warm-up run, as `sd-studio bench`
does): text encoding (prompt and negative prompt), one denoising step (a CFG-batched UNet call
plus the sampler; on CUDA synchronised after every step, so a step's time is its GPU time;
the first step's interval is skipped as it holds the pipeline's own setup), VAE decode per
image (one image at a time, to 8-bit RGB on the host, like ours), peak memory (CUDA:
torch.cuda.max_memory_allocated and max_memory_reserved, reset per case, and device memory in
use above what was in use before the model was loaded, read from free VRAM as ours does).
--grid: the studio's 2x4 grid, 8 images end to end (prompt, every step, TAESD previews of all
8 latents after every step, timed apart from the step, then a VAE decode of each image).
--compile: the per-batch step timing again with `torch.compile` on the UNet (mode
--compile-mode, default "reduce-overhead": Inductor kernels plus CUDA graphs, which compiles
the SD 1.5 UNet in a minute or two per batch shape; "max-autotune" would take far longer);
the first (compiling) call is reported apart.
diffusers runs its default attention, PyTorch scaled_dot_product_attention (AttnProcessor2_0).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
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
# SDXL base's published configs (--family sdxl): UNet 2.6 B parameters, CLIP ViT-L and
# OpenCLIP ViT-bigG with projection, the same VAE architecture at scaling factor 0.13025.
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
SDXL_TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                   projection_dim=1280, pad_token_id=1)
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "steps_offset": 1,
    "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False,
}
FAMILY = {"name": "sd15"}  # set from --family in main()
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
GRID_BATCH = 8
GIB = float(1 << 30)


class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop, but still print and save what was measured. A
    BaseException, like KeyboardInterrupt, so that no library's `except Exception` eats it."""


def _on_sigterm(_sig, _frame):
    raise Interrupted("stopped by SIGTERM (time limit?)")


# ---------------------------------------------------------------------------------------------
# Random models


def make_model(path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if (path / "model_index.json").exists():
        return
    sdxl = FAMILY["name"] == "sdxl"
    print(f"making random {'SDXL' if sdxl else 'SD 1.5'}-sized weights in {path} (once)", file=sys.stderr)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    tok_dir = ROOT / "tests" / "fixtures" / "tiny-sd15" / "tokenizer"
    if sdxl:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
        from transformers import CLIPTextModelWithProjection

        vae = AutoencoderKL(**VAE)
        vae.register_to_config(scaling_factor=0.13025)
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)),
            tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
            tokenizer_2=CLIPTokenizer.from_pretrained(ROOT / "tests" / "fixtures" / "tiny-sd2v" / "tokenizer"),
            unet=UNet2DConditionModel(**SDXL_UNET),
            scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        )
    else:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    # The hub's SD repos ship vocab.json + merges.txt; transformers 5 saves tokenizer.json.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tok_dir / name, tmp / "tokenizer" / name)
        if sdxl:
            shutil.copy(ROOT / "tests" / "fixtures" / "tiny-sd2v" / "tokenizer" / name, tmp / "tokenizer_2" / name)
    tmp.rename(path)
    print(f"  made in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def make_controlnet(model: Path, path: Path) -> None:
    """A random full-size ControlNet for the random model: ControlNetModel.from_unet (its
    zero convolutions randomised so the residuals are not all zero), saved in f16 as the
    hub's ControlNets are."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    if (path / "config.json").exists():
        return
    print(f"making a random ControlNet in {path} (once)", file=sys.stderr)
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float32)
    cn = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for name, q in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                q.normal_(0, 0.02)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cn.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    tmp.rename(path)


def control_map(size: int):
    """The map `sd-studio bench --controlnet` uses without --control-image: white lines every
    64 pixels (at 16 mod 64) on black."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    on = (x % 64 == 16) | (y % 64 == 16)
    return Image.fromarray(np.repeat((on * 255).astype(np.uint8)[..., None], 3, axis=-1))


def make_taesd(path: Path) -> None:
    """A random TAESD for SD 1.x: AutoencoderTiny's default config, saved as our loader reads
    it (config.json + diffusion_pytorch_model.safetensors)."""
    import torch
    from diffusers import AutoencoderTiny

    if (path / "config.json").exists():
        return
    print(f"making a random full-size TAESD in {path} (once)", file=sys.stderr)
    torch.manual_seed(0)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    AutoencoderTiny().to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    tmp.rename(path)


# ---------------------------------------------------------------------------------------------
# Helpers


def median(v):
    v = sorted(x for x in v if x is not None)
    return v[len(v) // 2] if v else None


def spread(v):
    v = sorted(v)
    return (v[len(v) // 2], v[0], v[-1]) if v else (None, None, None)


def run_cmd(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def torch_dtype(name: str):
    import torch

    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[name]


class Dev:
    """The torch device plus synchronisation and memory readings."""

    def __init__(self, name: str):
        import torch

        self.torch = torch
        self.name = name
        self.cuda = name == "cuda"
        self.base_free = None
        if self.cuda:
            torch.cuda.init()
            torch.zeros(1, device="cuda")  # create the context before the baseline
            torch.cuda.synchronize()
            self.base_free = torch.cuda.mem_get_info()[0]

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def release(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()

    def memory(self) -> dict:
        if not self.cuda:
            import resource

            # The process's peak RSS so far (Linux: KiB), as `sd-studio bench` reports its own.
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
            return {"peak_allocated_gib": None, "peak_reserved_gib": None, "vram_used_gib": None,
                    "peak_rss_gib": rss}
        t = self.torch
        t.cuda.synchronize()
        return {
            "peak_allocated_gib": t.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": t.cuda.max_memory_reserved() / GIB,
            # What `sd-studio bench` reports: device memory in use above the baseline taken
            # before loading, from free VRAM (torch's cache keeps its peak reserved).
            "vram_used_gib": (self.base_free - t.cuda.mem_get_info()[0]) / GIB,
        }


def env_info(a) -> dict:
    import torch

    info = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torch_threads": torch.get_num_threads(),
    }
    for mod in ("diffusers", "transformers", "safetensors", "huggingface_hub", "triton", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional, informative only
            info[mod] = None
    smi = run_cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    info["nvidia_smi"] = smi
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = p.total_memory / GIB
        info["gpu_sms"] = p.multi_processor_count
        info["gpu_capability"] = f"{p.major}.{p.minor}"
        info["sdp_flash"] = torch.backends.cuda.flash_sdp_enabled()
        info["sdp_mem_efficient"] = torch.backends.cuda.mem_efficient_sdp_enabled()
        info["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    info["git_commit"] = run_cmd(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return info


def to_rgb8(img):
    """[-1, 1] images to 8-bit RGB on the host, as our decode and previews do."""
    import torch

    return ((img.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


# ---------------------------------------------------------------------------------------------
# diffusers


def load_pipe(path: Path, a, dev: Dev):
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    t0 = time.perf_counter()
    if FAMILY["name"] == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=torch_dtype(a.dtype))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            path, torch_dtype=torch_dtype(a.dtype), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev.name)
    dev.sync()
    return pipe, time.perf_counter() - t0


class Times:
    def __init__(self):
        self.encode = None
        self.steps = []  # seconds per denoising step, the first skipped
        self.previews = []  # seconds per step for the TAESD previews of all latents
        self.decode = None  # all images, one at a time
        self.total = None  # prompt .. decoded images (grid) / the pipeline call (steps)
        self.call = None  # the pipeline call alone (prompt + every step)
        self.faults = []  # minor page faults per step (the same intervals as `steps`)
        self.sys = []  # system seconds per step


def run_once(pipe, a, batch: int, dev: Dev, taesd=None, encode_apart=True, mark_step=False) -> Times:
    """One generation: text encoding (timed on its own), the pipeline with a synchronising
    step callback (and TAESD previews of the current latents of every image after every
    step when `taesd`), then a VAE decode of each image to 8-bit RGB."""
    import torch

    t = Times()
    with torch.inference_mode():
        if encode_apart:
            t0 = time.perf_counter()
            if FAMILY["name"] == "sdxl":
                pipe.encode_prompt(prompt=PROMPT, device=dev.name, num_images_per_prompt=batch,
                                   do_classifier_free_guidance=True, negative_prompt="")
            else:
                pipe.encode_prompt(PROMPT, dev.name, batch, True, "")
            dev.sync()
            t.encode = time.perf_counter() - t0
        marks = []  # (end of step, end of the callback's own work)
        usage = []  # (minor faults, system seconds) at the same two points

        def rusage():
            import resource

            r = resource.getrusage(resource.RUSAGE_SELF)
            return r.ru_minflt, r.ru_stime

        def on_step(_p, _i, _t, kw):
            dev.sync()
            end = time.perf_counter()
            at_end = rusage()
            if taesd is not None:
                to_rgb8(taesd.decode(kw["latents"].to(taesd.dtype), return_dict=False)[0])
                dev.sync()
            if mark_step:  # CUDA graphs (reduce-overhead): a new iteration begins
                torch.compiler.cudagraph_mark_step_begin()
            marks.append((end, time.perf_counter()))
            usage.append((at_end, rusage()))
            return kw

        extra = {"image": control_map(a.size)} if hasattr(pipe, "controlnet") else {}
        start = time.perf_counter()
        latents = pipe(PROMPT, **extra, height=a.size, width=a.size, num_inference_steps=a.steps,
                       guidance_scale=GUIDANCE, num_images_per_prompt=batch, output_type="latent",
                       generator=torch.Generator("cpu").manual_seed(0),
                       callback_on_step_end=on_step).images
        dev.sync()
        t.call = time.perf_counter() - start
        t0 = time.perf_counter()
        sf = pipe.vae.config.scaling_factor
        for i in range(batch):
            to_rgb8(pipe.vae.decode(latents[i : i + 1] / sf, return_dict=False)[0])
        t.decode = time.perf_counter() - t0
        t.total = time.perf_counter() - start
    # Step i's time: from the end of the previous step's callback to this step's end. The
    # first step's interval also holds the pipeline's setup (prompt encoding...): skipped.
    t.steps = [b[0] - p[1] for p, b in zip(marks, marks[1:])]
    # The same intervals' minor page faults and system time (as `sd-studio bench` reports).
    t.faults = [b[0][0] - p[1][0] for p, b in zip(usage, usage[1:])]
    t.sys = [b[0][1] - p[1][1] for p, b in zip(usage, usage[1:])]
    if taesd is not None:
        t.previews = [r - e for e, r in marks]
    return t


def steps_case(pipe, a, batch: int, dev: Dev, label: str, mark_step=False) -> dict:
    dev.release()
    t0 = time.perf_counter()
    first = run_once(pipe, a, batch, dev, mark_step=mark_step)  # warm-up (compiles if compiled)
    warm = time.perf_counter() - t0
    dev.reset_peak()
    enc, step, dec, calls, faults, sys_s = [], [], [], [], [], []
    for _ in range(a.runs):
        t = run_once(pipe, a, batch, dev, mark_step=mark_step)
        enc.append(t.encode)
        step += t.steps
        faults += t.faults
        sys_s += t.sys
        dec.append(t.decode / batch)
        calls.append(t.call)
    st, st_min, st_max = spread(step)
    line = {
        "case": "steps", "batch": batch, "text_encode_s": median(enc),
        "step_s": st, "step_min_s": st_min, "step_max_s": st_max,
        "it_per_s": 1 / st if st else None,
        "images_per_s_denoising": batch / (st * a.steps) if st else None,
        "decode_per_image_s": median(dec),
        "warmup_run_s": warm, "warmup_call_s": first.call, "call_s": median(calls),
        "minor_faults_per_step": median(faults) if faults else None,
        "sys_s_per_step": median(sys_s) if sys_s else None,
        **dev.memory(),
    }
    print(f"{label} batch {batch}: step {st:.4f} s ({line['it_per_s']:.2f} it/s), decode "
          f"{line['decode_per_image_s']:.4f} s/image, warm-up run {warm:.1f} s, "
          f"peak reserved {fmt(line['peak_reserved_gib'], 2)} GiB", file=sys.stderr)
    return line


def grid_case(pipe, taesd, a, dev: Dev) -> dict:
    dev.release()
    run_once(pipe, a, GRID_BATCH, dev, taesd=taesd, encode_apart=False)  # warm-up
    dev.reset_peak()
    total, step, prev, dec = [], [], [], []
    for _ in range(a.runs):
        t = run_once(pipe, a, GRID_BATCH, dev, taesd=taesd, encode_apart=False)
        total.append(t.total)
        step += t.steps
        prev += t.previews
        dec.append(t.decode)
    st, pv = median(step), median(prev)
    line = {
        "case": "grid", "batch": GRID_BATCH, "total_s": median(total), "step_s": st,
        "decode_s": median(dec), "preview_per_step_s": pv,
        "preview_fraction_of_step": pv / st if (pv is not None and st) else None,
        **dev.memory(),
    }
    print(f"diffusers grid 2x4: {line['total_s']:.3f} s end to end, step {st:.4f} s, previews "
          f"{fmt(pv, 4)} s/step, decode {line['decode_s']:.3f} s", file=sys.stderr)
    return line


def bench_diffusers(path: Path, taesd_dir: Path | None, a, dev: Dev, res: dict, save) -> None:
    import torch
    from diffusers import AutoencoderTiny

    out = res["diffusers"] = {"cases": []}
    pipe, load_s = load_pipe(path, a, dev)
    out["load_s"] = load_s
    out["weights_gib"] = torch.cuda.memory_allocated() / GIB if dev.cuda else None
    procs = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
    out["attention"] = ", ".join(procs) + (
        " (PyTorch scaled_dot_product_attention, diffusers' default)" if procs == ["AttnProcessor2_0"] else "")
    for batch in a.batch_list:
        out["cases"].append(steps_case(pipe, a, batch, dev, "diffusers"))
        save()
    if a.grid:
        taesd = None
        if taesd_dir is not None:
            taesd = AutoencoderTiny.from_pretrained(taesd_dir, torch_dtype=torch_dtype(a.dtype)).to(dev.name)
        out["cases"].append(grid_case(pipe, taesd, a, dev))
        del taesd
        save()
    if a.controlnet:
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

        cn = ControlNetModel.from_pretrained(a.controlnet_dir, torch_dtype=torch_dtype(a.dtype)).to(dev.name)
        cpipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=cn)
        cpipe.set_progress_bar_config(disable=True)
        cases = res["diffusers_controlnet"] = {"cases": []}
        for batch in a.batch_list:
            cases["cases"].append(steps_case(cpipe, a, batch, dev, "diffusers + ControlNet"))
            save()
        del cpipe, cn
    del pipe
    dev.release()


def bench_compiled(path: Path, a, dev: Dev, res: dict, save) -> None:
    import torch

    mark = dev.cuda and "reduce-overhead" in a.compile_mode
    out = res["diffusers_compile"] = {
        "mode": a.compile_mode, "fullgraph": True, "dynamic": False, "cases": [], "skipped": [],
        "note": "torch.compile on the UNet only; first run per batch shape compiles (warmup_run_s)",
    }
    pipe, _ = load_pipe(path, a, dev)
    pipe.unet = torch.compile(pipe.unet, mode=a.compile_mode, fullgraph=True, dynamic=False)
    phase0 = time.perf_counter()
    last_warm = 0.0
    for batch in a.compile_batch_list:
        spent = time.perf_counter() - phase0
        left = a.deadline_s - (time.perf_counter() - a.t_start) if a.deadline_s else None
        why = None
        if out["cases"] and a.compile_budget_s and spent + last_warm > a.compile_budget_s:
            why = f"compile budget {a.compile_budget_s:.0f} s"
        elif left is not None and left < max(1.2 * last_warm, 60):
            why = f"--deadline-s {a.deadline_s:.0f}: {left:.0f} s left"
        if why:
            out["skipped"].append(batch)
            print(f"compile: skipping batch {batch} ({spent:.0f} s spent in this phase, the last "
                  f"shape's warm-up took {last_warm:.0f} s; {why})", file=sys.stderr)
            continue
        try:
            line = steps_case(pipe, a, batch, dev, f"diffusers+compile({a.compile_mode})", mark_step=mark)
        except Interrupted:
            raise
        except Exception as e:  # noqa: BLE001 - report and go on
            out["error"] = f"batch {batch}: {type(e).__name__}: {e}"
            print(f"compile failed: {out['error']}", file=sys.stderr)
            break
        last_warm = line["warmup_run_s"]
        out["cases"].append(line)
        save()
    out["phase_s"] = time.perf_counter() - phase0
    del pipe
    dev.release()


# ---------------------------------------------------------------------------------------------
# sd-studio


def bench_ours(path: Path, taesd_dir: Path | None, a, res: dict, key: str = "sd_studio",
               extra: list[str] | None = None) -> None:
    cmd = [str(a.sd_studio), "bench", "--model", str(path), "--device", a.device, "--dtype", a.dtype,
           "--width", str(a.size), "--height", str(a.size), "--steps", str(a.steps),
           "--batches", ",".join(map(str, a.batch_list)), "--runs", str(a.runs),
           "--threads", str(a.threads), "--scheduler", "dpm++2m-karras", "--guidance", str(GUIDANCE),
           "--memory", a.memory]
    if a.grid:
        cmd.append("--grid")
        if taesd_dir is not None:
            cmd += ["--taesd", str(taesd_dir)]
    cmd += shlex.split(a.ours_args) + (extra or [])
    res[key + "_cmd"] = shlex.join(cmd)
    print(f"running: {res[key + '_cmd']}", file=sys.stderr)
    out_lines, err_tail = [], []

    def pump(stream, sink, echo):
        for line in stream:
            sink.append(line.rstrip("\n"))
            if echo:
                print(f"  sd-studio: {line.rstrip()}", file=sys.stderr, flush=True)
            if sink is err_tail and len(sink) > 400:
                del sink[:-200]

    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        res[key] = None
        res[key + "_error"] = f"could not start {cmd[0]}: {e}"
        print(f"sd-studio bench failed: {res[key + '_error']}", file=sys.stderr)
        return
    threads = [threading.Thread(target=pump, args=(proc.stdout, out_lines, False), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err_tail, True), daemon=True)]
    for th in threads:
        th.start()
    error = "interrupted"
    try:
        rc = proc.wait(timeout=a.ours_timeout or None)
        error = f"exit status {rc}" if rc != 0 else None
    except subprocess.TimeoutExpired:
        error = f"timed out after {a.ours_timeout:.0f} s"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for th in threads:
            th.join(timeout=5)
        res[key + "_wall_s"] = time.perf_counter() - t0
        parsed = []
        for line in out_lines:
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        summary = next((p for p in reversed(parsed) if isinstance(p, dict) and "cases" in p), None)
        if summary is None:
            cases = [p for p in parsed if isinstance(p, dict) and "case" in p]
            if cases:  # a partial run: the cases it finished
                summary = {"cases": cases, "partial": True}
            if error is None:
                error = "no summary JSON line in its output"
        res[key] = summary
        if error is not None:
            res[key + "_error"] = error + ("; stderr tail:\n" + "\n".join(err_tail[-30:]) if err_tail else "")
            print(f"sd-studio bench failed: {res[key + '_error']}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Report


def fmt(x, nd=3, pct=False):
    if x is None:
        return "-"
    return f"{100 * x:.0f}%" if pct else f"{x:.{nd}f}"


def ratio(ours, theirs):
    return ours / theirs if (ours is not None and theirs) else None


def report(res: dict) -> None:
    e, s = res["env"], res["settings"]
    p = print
    p("")
    p(f"GPU: {e.get('nvidia_smi') or e.get('gpu') or 'none'}")
    p(f"machine: {e['cpu']}, {e['cpu_count']} cpus; python {e['python']}, torch {e['torch']} "
      f"(CUDA {e['torch_cuda']}, cuDNN {e['cudnn']}), diffusers {e['diffusers']}, "
      f"transformers {e['transformers']}, triton {e.get('triton')}; torch threads {e['torch_threads']}")
    p(f"settings: {s['device']} {s['dtype']}, {s['size']}x{s['size']}, DPM++ 2M Karras, "
      f"{s['steps']} steps, CFG {GUIDANCE}, {s['runs']} timed runs after 1 warm-up, "
      f"sd-studio --memory {s['memory']}")
    d = res.get("diffusers") or {}
    dc = res.get("diffusers_compile") or {}
    o = res.get("sd_studio") or {}
    if d.get("attention"):
        p(f"diffusers attention: {d['attention']}")
    if o:
        p(f"sd-studio: memory {o.get('memory')}, attention slicing {o.get('attention_slicing')}, "
          f"load {fmt(o.get('load_s'), 2)} s, weights {fmt(o.get('weights_gib'), 2)} GiB; "
          f"diffusers load {fmt(d.get('load_s'), 2)} s, weights {fmt(d.get('weights_gib'), 2)} GiB")
    if dc:
        p(f"diffusers+compile: torch.compile(unet, mode={dc['mode']!r}, fullgraph=True, dynamic=False)"
          + (f"; skipped batches {dc['skipped']}" if dc.get("skipped") else "")
          + (f"; ERROR {dc['error']}" if dc.get("error") else ""))

    def by_batch(src, case="steps"):
        return {c["batch"]: c for c in (src.get("cases") or []) if c.get("case") == case}

    db, ob, cb = by_batch(d), by_batch(o), by_batch(dc)
    batches = sorted(set(db) | set(ob) | set(cb))
    p("")
    p("denoising: median seconds per step (one CFG-batched UNet call + sampler) and it/s; "
      "ratio = sd-studio time / diffusers time (>1: we are slower)")
    h = (f"{'batch':>5} {'diff s':>9} {'diff it/s':>9} {'ours s':>9} {'ours it/s':>9} {'ratio':>6}"
         f" {'comp s':>9} {'comp it/s':>9} {'ours/comp':>9} {'comp 1st run s':>14}")
    p(h)
    for b in batches:
        x, y, z = db.get(b, {}), ob.get(b, {}), cb.get(b, {})
        p(f"{b:>5} {fmt(x.get('step_s'), 4):>9} {fmt(x.get('it_per_s'), 2):>9} "
          f"{fmt(y.get('step_s'), 4):>9} {fmt(y.get('it_per_s'), 2):>9} "
          f"{fmt(ratio(y.get('step_s'), x.get('step_s')), 2):>6} "
          f"{fmt(z.get('step_s'), 4):>9} {fmt(z.get('it_per_s'), 2):>9} "
          f"{fmt(ratio(y.get('step_s'), z.get('step_s')), 2):>9} {fmt(z.get('warmup_run_s'), 1):>14}")
    p("")
    p("per batch: images/s while denoising, text encode s, VAE decode s per image, peak memory GiB "
      "(diffusers: torch max allocated / max reserved / VRAM used; sd-studio: VRAM used above baseline)")
    p(f"{'batch':>5} {'diff img/s':>10} {'ours img/s':>10} {'diff enc':>9} {'ours enc':>9} "
      f"{'diff dec':>9} {'ours dec':>9} {'ratio':>6} {'diff alloc':>10} {'diff rsrv':>9} "
      f"{'diff vram':>9} {'ours vram':>9}")
    for b in batches:
        x, y = db.get(b, {}), ob.get(b, {})
        p(f"{b:>5} {fmt(x.get('images_per_s_denoising'), 3):>10} {fmt(y.get('images_per_s_denoising'), 3):>10} "
          f"{fmt(x.get('text_encode_s'), 4):>9} {fmt(y.get('text_encode_s'), 4):>9} "
          f"{fmt(x.get('decode_per_image_s'), 4):>9} {fmt(y.get('decode_per_image_s'), 4):>9} "
          f"{fmt(ratio(y.get('decode_per_image_s'), x.get('decode_per_image_s')), 2):>6} "
          f"{fmt(x.get('peak_allocated_gib'), 2):>10} {fmt(x.get('peak_reserved_gib'), 2):>9} "
          f"{fmt(x.get('vram_used_gib'), 2):>9} {fmt(y.get('peak_gib'), 2):>9}")
    if any(db.get(b, {}).get("minor_faults_per_step") is not None or
           db.get(b, {}).get("peak_rss_gib") is not None for b in batches):
        p("")
        p("CPU, per step: minor page faults and system seconds (getrusage), and the process's "
          "peak RSS GiB (diffusers: ru_maxrss; sd-studio: VmHWM)")
        p(f"{'batch':>5} {'diff faults':>11} {'ours faults':>11} {'diff sys':>9} {'ours sys':>9} "
          f"{'diff rss':>9} {'ours rss':>9}")
        for b in batches:
            x, y = db.get(b, {}), ob.get(b, {})
            p(f"{b:>5} {fmt(x.get('minor_faults_per_step'), 0):>11} "
              f"{fmt(y.get('minor_faults_per_step'), 0):>11} {fmt(x.get('sys_s_per_step'), 2):>9} "
              f"{fmt(y.get('sys_s_per_step'), 2):>9} {fmt(x.get('peak_rss_gib'), 2):>9} "
              f"{fmt(y.get('peak_gib'), 2):>9}")
    dg, og = by_batch(d, "grid").get(GRID_BATCH), by_batch(o, "grid").get(GRID_BATCH)
    if dg or og:
        dg, og = dg or {}, og or {}
        p("")
        p(f"grid 2x4 ({GRID_BATCH} images, {s['steps']} steps, TAESD previews of all 8 after every "
          f"step, VAE decode of each): seconds")
        p(f"{'':<22}{'diffusers':>11}{'sd-studio':>11}{'ratio':>8}")
        for k, label, nd, pct in [("total_s", "end to end", 3, False), ("step_s", "step", 4, False),
                                  ("preview_per_step_s", "previews per step", 4, False),
                                  ("preview_fraction_of_step", "previews / step", 0, True),
                                  ("decode_s", "decode (8 images)", 3, False)]:
            p(f"{label:<22}{fmt(dg.get(k), nd, pct):>11}{fmt(og.get(k), nd, pct):>11}"
              f"{fmt(ratio(og.get(k), dg.get(k)), 2):>8}")
        p(f"{'peak GiB':<22}{fmt(dg.get('peak_reserved_gib'), 2):>11}{fmt(og.get('peak_gib'), 2):>11}"
          f"   (diffusers: max reserved; alloc {fmt(dg.get('peak_allocated_gib'), 2)}, "
          f"VRAM used {fmt(dg.get('vram_used_gib'), 2)})")
    dcn, ocn = by_batch(res.get("diffusers_controlnet") or {}), by_batch(res.get("sd_studio_controlnet") or {})
    if dcn or ocn:
        p("")
        p("ControlNet (one, full-size random weights, synthetic map): median seconds per step without / with, "
          "and with/without; ratio = sd-studio / diffusers")
        p(f"{'batch':>5} {'diff s':>9} {'diff+CN s':>9} {'diff x':>7} {'ours s':>9} {'ours+CN s':>9} "
          f"{'ours x':>7} {'ratio+CN':>8}")
        for b in sorted(set(dcn) | set(ocn)):
            x0, x1 = db.get(b, {}).get("step_s"), dcn.get(b, {}).get("step_s")
            y0, y1 = ob.get(b, {}).get("step_s"), ocn.get(b, {}).get("step_s")
            p(f"{b:>5} {fmt(x0, 4):>9} {fmt(x1, 4):>9} {fmt(ratio(x1, x0), 2):>7} {fmt(y0, 4):>9} "
              f"{fmt(y1, 4):>9} {fmt(ratio(y1, y0), 2):>7} {fmt(ratio(y1, x1), 2):>8}")
    for k in ("sd_studio_error", "sd_studio_controlnet_error"):
        if res.get(k):
            p("")
            p(f"sd-studio FAILED ({k}): {res[k]}")
    if res.get("error"):
        p("")
        p(f"ERROR: {res['error']}")


# ---------------------------------------------------------------------------------------------


def parse_batches(text: str, what: str) -> list[int]:
    out = []
    for x in text.split(","):
        try:
            b = int(x.strip())
        except ValueError:
            b = 0
        if b <= 0:
            sys.exit(f"{what}: {x.strip()!r} in {text!r} is not a positive batch size")
        if b not in out:
            out.append(b)
    return out


def check_args(p: argparse.ArgumentParser, a) -> None:
    if a.size < 64 or a.size % 8:
        p.error(f"--size {a.size}: must be a multiple of 8, at least 64")
    if a.steps < 2:
        p.error(f"--steps {a.steps}: at least 2 (the first step's interval is not timed)")
    if a.runs < 1:
        p.error(f"--runs {a.runs}: at least 1")
    if a.threads < 1:
        p.error(f"--threads {a.threads}: at least 1")
    a.batch_list = parse_batches(a.batches if a.batches else str(a.batch), "--batches")
    a.compile_batch_list = (parse_batches(a.compile_batches, "--compile-batches")
                            if a.compile_batches else list(a.batch_list))
    if a.dtype is None:
        a.dtype = "f16" if a.device == "cuda" else "f32"
    if not a.skip_ours:
        exe = Path(a.sd_studio)
        if not exe.is_file() or not os.access(exe, os.X_OK):
            p.error(f"--sd-studio {exe}: no executable there (build it: `cargo build --release`, with "
                    "`--no-default-features --features cuda` for --device cuda), or pass --skip-ours")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error(f"--device cuda: torch {torch.__version__} sees no CUDA GPU "
                    f"(torch.version.cuda={torch.version.cuda})")
    elif a.dtype != "f32":
        print(f"note: --dtype {a.dtype} on the CPU: PyTorch and candle CPU kernels are slow in "
              "half precision", file=sys.stderr)
    if a.compile and a.skip_diffusers:
        p.error("--compile times diffusers: drop --skip-diffusers")
    if a.out:
        out = Path(a.out)
        if not out.parent.is_dir():
            p.error(f"--out {out}: folder {out.parent} does not exist")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["sd15", "sdxl"], default="sd15",
                   help="random full-size SD 1.5 (default) or SDXL base weights")
    p.add_argument("--model-dir", default=os.environ.get("SD_BENCH_MODEL"),
                   help="random model folder, made there if missing (default /tmp/FAMILY-random)")
    p.add_argument("--taesd-dir", help="random TAESD folder, made there if missing "
                   "(default: beside --model-dir, named <model-dir>-taesd); used by --grid")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16"], help="default f32 on cpu, f16 on cuda")
    p.add_argument("--size", type=int, default=256, help="image width and height in pixels")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--batches", help="batch sizes to time, comma-separated, e.g. 1,4,8 (default: --batch)")
    p.add_argument("--grid", action="store_true",
                   help="also time the 2x4 grid: 8 images end to end with TAESD previews every step")
    p.add_argument("--runs", type=int, default=2, help="timed runs per case, after one warm-up")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and for sd-studio")
    p.add_argument("--compile", action="store_true", help="also time diffusers with torch.compile on the UNet")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode (default reduce-overhead: Inductor + CUDA graphs)")
    p.add_argument("--compile-batches", help="batch sizes for --compile (default: all of --batches)")
    p.add_argument("--compile-budget-s", type=float, default=300,
                   help="start no new compiled batch shape once this many seconds of compile-phase "
                        "time plus the last shape's warm-up would be exceeded (0: no limit)")
    p.add_argument("--deadline-s", type=float, default=0,
                   help="whole-run seconds: start no compiled batch shape that would not end in "
                        "time (0: no limit; stop the run itself with SIGTERM, e.g. `timeout`)")
    p.add_argument("--sd-studio", default=str(ROOT / "target" / "release" / "sd-studio"))
    p.add_argument("--memory", default="auto", help="sd-studio --memory (auto|full|medvram|lowvram)")
    p.add_argument("--ours-args", default="", help="extra arguments for `sd-studio bench`")
    p.add_argument("--ours-timeout", type=float, default=0, help="seconds; 0: no limit")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--controlnet", action="store_true",
                   help="also time every batch with a random full-size ControlNet (made beside the model once)")
    p.add_argument("--out", help="write every result and the environment to this JSON file")
    a = p.parse_args()
    FAMILY["name"] = a.family
    if not a.model_dir:
        a.model_dir = f"/tmp/{a.family}-random"
    a.t_start = time.perf_counter()
    check_args(p, a)
    signal.signal(signal.SIGTERM, _on_sigterm)

    import torch
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    torch.set_num_threads(a.threads)
    path = Path(a.model_dir)
    taesd_dir = Path(a.taesd_dir) if a.taesd_dir else path.with_name(path.name + "-taesd")
    a.controlnet_dir = path.with_name(path.name + "-controlnet")
    res: dict = {
        "settings": {"family": a.family, "device": a.device, "dtype": a.dtype, "size": a.size, "steps": a.steps,
                     "batches": a.batch_list, "grid": a.grid, "runs": a.runs, "threads": a.threads,
                     "guidance": GUIDANCE, "scheduler": "DPM++ 2M Karras", "prompt": PROMPT,
                     "memory": a.memory, "model_dir": str(path),
                     "taesd_dir": str(taesd_dir) if a.grid else None,
                     "compile": a.compile, "compile_mode": a.compile_mode if a.compile else None,
                     "controlnet": str(a.controlnet_dir) if a.controlnet else None},
        "env": env_info(a),
    }

    def save():
        if a.out:
            tmp = Path(a.out + ".tmp")
            tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
            tmp.replace(a.out)

    t_start = a.t_start
    try:
        try:
            make_model(path)
            if a.grid:
                make_taesd(taesd_dir)
            if a.controlnet:
                make_controlnet(path, a.controlnet_dir)
        except Interrupted:
            raise
        except Exception as e:  # noqa: BLE001
            res["error"] = f"making the random model failed: {type(e).__name__}: {e}"
            raise
        dev = Dev(a.device)
        save()
        if not a.skip_diffusers:
            try:
                bench_diffusers(path, taesd_dir if a.grid else None, a, dev, res, save)
            except Interrupted:
                raise
            except Exception as e:  # noqa: BLE001 - still run ours
                import traceback

                traceback.print_exc()
                res["diffusers_error"] = f"{type(e).__name__}: {e}"
            if res.get("diffusers_error"):
                dev.release()  # outside `except`: the traceback no longer holds the pipeline
            save()
        if not a.skip_ours:
            bench_ours(path, taesd_dir if a.grid else None, a, res)
            save()
            if a.controlnet:
                bench_ours(path, None, a, res, "sd_studio_controlnet", ["--controlnet", str(a.controlnet_dir)])
                save()
        if a.compile:
            bench_compiled(path, a, dev, res, save)
            save()
    except (Interrupted, KeyboardInterrupt) as e:
        res["error"] = f"interrupted: {e or type(e).__name__}"
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        res.setdefault("error", f"{type(e).__name__}: {e}")
    finally:
        res["wall_s"] = time.perf_counter() - t_start
        save()
        report(res)
        print(json.dumps(res, default=str))
    if res.get("error") or res.get("diffusers_error"):
        sys.exit(1)


if __name__ == "__main__":
    main()
