"""LoRA switching benchmark: random full-size kohya LoRAs for a random full-size model
(made by tests/bench_diffusers.py), and `sd-studio bench --lora` timing how long merging
them into the loaded weights takes (first time, the same set again, every weight changed,
all removed) and the denoising step with and without them.

    python tests/bench_diffusers.py --family sd15 --model-dir /tmp/m15 ...   # makes the model
    cargo build --release
    python tests/bench_lora.py --model-dir /tmp/m15 --size 512
    python tests/bench_lora.py --model-dir /tmp/sdxl-random --size 1024 --steps 1

The LoRAs are shaped as kohya-ss trains them: rank 32, alpha 16, every attention projection,
proj_in/out and feed-forward layer of the UNet and every attention and MLP layer of the text
encoder(s); the third is a LoCon (ResNet convolutions and down/upsamplers too). Weight
values do not change the timing. Files go to --lora-dir (default: MODEL_DIR-loras), made once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
UNET_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
CONV_LEAVES = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
TE_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def shapes(folder: Path) -> dict[str, list[int]]:
    files = sorted(p for p in folder.glob("*.safetensors") if ".fp16." not in p.name) or sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(f, "pt") as st:
            for k in st.keys():
                out[k] = list(st.get_slice(k).get_shape())
    return out


def make_lora(model: Path, path: Path, seed: int, locon: bool, rank: int = 32, alpha: float = 16.0) -> None:
    if path.exists():
        return
    g = torch.Generator().manual_seed(seed)
    tensors = {}

    def add(prefix: str, module: str, shape: list[int]):
        key = prefix + module.replace(".", "_")
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        tensors[f"{key}.lora_down.weight"] = (torch.randn([rank] + shape[1:], generator=g) / fan_in ** 0.5).half()
        up = [shape[0], rank] + ([1, 1] if len(shape) == 4 else [])
        tensors[f"{key}.lora_up.weight"] = (torch.randn(up, generator=g) * 1e-3).half()
        tensors[f"{key}.alpha"] = torch.tensor(alpha).half()

    for name, shape in shapes(model / "unet").items():
        if not name.endswith(".weight") or len(shape) not in (2, 4):
            continue
        module = name[: -len(".weight")]
        if ("attentions" in module and module.endswith(UNET_LEAVES)) or (locon and module.endswith(CONV_LEAVES)):
            add("lora_unet_", module, shape)
    encoders = [("text_encoder", "lora_te_")]
    if (model / "text_encoder_2").exists():
        encoders = [("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")]
    for folder, prefix in encoders:
        for name, shape in shapes(model / folder).items():
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module and module.endswith(TE_LEAVES):
                add(prefix, module.removeprefix("text_model."), shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    print(f"  {path.name}: {len(tensors) // 3} modules, {path.stat().st_size / 1e6:.0f} MB", file=sys.stderr)


def bench(a, loras: list[Path]) -> list[dict]:
    cmd = [str(ROOT / "target" / "release" / "sd-studio"), "bench", "--model", str(a.model_dir),
           "--width", str(a.size), "--height", str(a.size), "--steps", str(a.steps), "--runs", str(a.runs),
           "--threads", str(a.threads), "--device", a.device]
    for l in loras:
        cmd += ["--lora", f"{l}:0.8"]
    print("+ " + " ".join(cmd), file=sys.stderr)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    sys.stderr.write(out.stderr)
    return [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--lora-dir", type=Path)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    lora_dir = a.lora_dir or a.model_dir.with_name(a.model_dir.name + "-loras")
    files = [lora_dir / f"random_{i}.safetensors" for i in range(3)]
    for i, f in enumerate(files):
        make_lora(a.model_dir, f, 100 + i, locon=(i == 2))
    rows = {"none": bench(a, []), "one": bench(a, files[:1]), "three": bench(a, files)}
    print(json.dumps(rows, indent=1))
    for label, r in rows.items():
        step = next((x["step_s"] for x in r if x.get("case") == "steps"), None)
        lora = next((x for x in r if x.get("case") == "lora"), None)
        if lora:
            print(f"{label}: first apply {lora['first_apply_s']:.2f} s ({lora['tensors']} tensors), same set "
                  f"{lora['same_set_s']:.4f} s, weights changed {lora['weights_changed_s']:.2f} s, removed "
                  f"{lora['removed_s']:.2f} s, originals kept {lora['kept_originals_gib']:.2f} GiB; step {step:.3f} s")
        else:
            print(f"{label}: step {step:.3f} s")


if __name__ == "__main__":
    main()
