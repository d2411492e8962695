"""CUDA parity on the tiny fixtures: the CUDA build of `sd-studio generate` against
diffusers' reference images (tests/fixtures/refs/cases.json), in f32, f16 and bf16, and the
memory modes (medvram, lowvram, attention slicing) against the full mode on the GPU.

Not run by CI (it needs an NVIDIA GPU). Run on a GPU machine from the repository root:

    python3 tests/gpu_parity.py --bin .gpu/sd-studio --out parity.json

CPU f32 matches these references within 2 levels per pixel (tests/pipeline.rs). On CUDA we
expect the same in f32; f16 and bf16 are reported (tiny random-weight models are less forgiving than
real ones, so its numbers say how far reduced precision moves a picture, not pass/fail).
Exit status 1 when any f32 case or any memory mode differs by more than 2 levels.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"


DEVICE = "cuda"


def run(bin_: str, case: dict, dtype: str, out: Path, extra: list[str]) -> dict[int, Path]:
    """Generates a reference case; returns seed → PNG path."""
    cmd = [bin_, "generate", "--model", str(FIX / case["model"]), "--device", DEVICE,
           "--dtype", dtype, "--rng", "torch-cpu", "--scheduler", case["scheduler"],
           "--steps", str(case["steps"]), "--guidance", str(case["guidance"]),
           "--prompt", case["prompt"], "--negative-prompt", case["negative_prompt"],
           "--width", str(case["width"]), "--height", str(case["height"]),
           "--seed", str(case["seeds"][0]), "--batch", str(len(case["seeds"])),
           "--out", str(out), *extra]
    if case.get("init_latents"):
        cmd += ["--init-latents", str(FIX / case["init_latents"])]
    if case.get("timestep_spacing"):
        cmd += ["--timestep-spacing", case["timestep_spacing"]]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{p.stderr.strip()}")
    paths = {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            j = json.loads(line)
            paths[j["seed"]] = Path(j["path"])
    return paths


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def diff(a: Path, b: Path) -> tuple[int, float]:
    d = np.abs(pixels(a) - pixels(b))
    return int(d.max()), float(d.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=str(ROOT / ".gpu" / "sd-studio"))
    ap.add_argument("--cases", type=int, default=0, help="at most this many cases (0: all)")
    ap.add_argument("--out", help="write the results here as JSON")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to try the script itself")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    cases = json.loads((FIX / "refs" / "cases.json").read_text())
    if a.cases:
        cases = cases[: a.cases]
    results, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, case in enumerate(cases):
            row = {"case": case["name"]}
            for dtype in ("f32", "f16", "bf16"):
                try:
                    got = run(a.bin, case, dtype, tmp / f"{i}-{dtype}", [])
                except RuntimeError as e:
                    row[dtype] = {"error": str(e)}
                    failures.append(f"{case['name']} {dtype}: {e}")
                    continue
                worst, mean = 0, 0.0
                for seed, ref in zip(case["seeds"], case["images"]):
                    m, avg = diff(got[seed], FIX / ref)
                    worst, mean = max(worst, m), max(mean, avg)
                row[dtype] = {"max": worst, "mean": round(mean, 4)}
                if dtype == "f32" and worst > 2:
                    failures.append(f"{case['name']} f32: max pixel difference {worst} > 2")
            results.append(row)
            print(f"{case['name']:<60} f32 {row['f32']}  f16 {row['f16']}  bf16 {row['bf16']}",
                  flush=True)

        # Memory modes on the GPU: the same pictures as the full mode (f16, first cases).
        modes = [["--memory", "medvram"], ["--memory", "lowvram"],
                 ["--attention-slicing", "16"], ["--vae-tiling", "on"]]
        for case in cases[:2]:
            base = run(a.bin, case, "f16", tmp / "mode-base", ["--memory", "full"])
            for extra in modes:
                name = " ".join(extra)
                got = run(a.bin, case, "f16", tmp / f"mode-{name.replace(' ', '_')}", extra)
                worst = max(diff(got[s], base[s])[0] for s in case["seeds"])
                results.append({"case": case["name"], "mode": name, "max_vs_full": worst})
                print(f"{case['name']:<60} {name:<24} max difference from full: {worst}", flush=True)
                # Tiling legitimately changes pixels (blended tiles) when the image spans tiles.
                if worst > 2 and extra[0] != "--vae-tiling":
                    failures.append(f"{case['name']} {name}: differs from full by {worst}")
    if a.out:
        Path(a.out).write_text(json.dumps({"results": results, "failures": failures}, indent=1))
    print(f"\n{len(failures)} failure(s)")
    for f in failures:
        print("  " + f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
