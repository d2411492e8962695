#!/usr/bin/env bash
# diffusers and sd-studio side by side on a lent GPU machine, in ONE device call:
# tests/bench_diffusers.py --device cuda --size 512 --steps 20 --batches 1,4,8 --grid --runs 3
# (and --compile with COMPILE=1), log and JSON written into $OUT. Runs ON the GPU machine,
# from the repo root; it ends within TOTAL seconds (default 560) plus at most 15 more.
#
# PREPARE HERE (the machine without a GPU), from /work/main, before the device call:
#   1. The wheels the GPU machine lacks (device README; KINDS.md lists what is installed
#      there: torch 2.11 cu130, transformers 5.17, huggingface_hub 1.33, safetensors 0.8,
#      tokenizers, numpy, pillow, regex, requests, filelock, accelerate, peft, triton are;
#      diffusers is NOT, and its other needs are all there; importlib_metadata is only
#      imported on Python < 3.8, and python3 there is 3.12):
#        grep -qx /.whl/ .git/info/exclude || echo /.whl/ >> .git/info/exclude
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#          --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#          --platform manylinux1_x86_64 -d .whl diffusers==0.42.1
#      (.whl/diffusers-0.42.1-py3-none-any.whl, 6.4 MB; keep only one version in .whl/.)
#   2. The headless CUDA binary (no window: smaller), stripped and xz-compressed:
#        eval "$(bash ../shared/gpu/cuda-build-env.sh)"
#        CARGO_TARGET_DIR=/work/target-cuda cargo build --release --no-default-features --features cuda
#        grep -qx /.gpu/ .git/info/exclude || echo /.gpu/ >> .git/info/exclude
#        mkdir -p .gpu && strip -o /tmp/sd-studio-cuda /work/target-cuda/release/sd-studio
#        xz -T2 -6 -c /tmp/sd-studio-cuda > .gpu/sd-studio.xz
#        git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1; du -cb .gpu .whl
#      Everything that travels must stay under 64 MiB (67,108,864 bytes). Seen 2026-11-23:
#      the working tree ~21.9 MB (16 MB of it tests/fixtures), the wheel 6.4 MB, the headless
#      CUDA binary 60.7 MB stripped: too big raw, 8.9 MB as .xz. This script unpacks
#      $BIN.xz (with python3's lzma) when $BIN itself is absent; a raw .gpu/sd-studio
#      (strip -o .gpu/sd-studio ...) is used as is where it fits.
#   3. The device call (one call; about 5-9 minutes on an H100):
#        run(command="bash tests/gpu_bench.sh", carry=[".gpu", ".whl"], timeout_s=600)
#      with torch.compile too:
#        run(command="COMPILE=1 bash tests/gpu_bench.sh", carry=[".gpu", ".whl"], timeout_s=600)
#      Files back: $OUT/bench.log (the table at its end), $OUT/bench.json (every number and
#      the environment), $OUT/env.txt (nvidia-smi, libraries, ldd), $OUT/smoke.log.
#
# PART=check runs the other half instead (ours only, no diffusers timing; about 5 minutes):
#   - tests/gpu_parity.py: the CUDA build against diffusers' reference images on the tiny
#     fixtures (f32, f16) and the memory modes against full, with the fused GroupNorm off and
#     on (SD_STUDIO_FUSED_GROUPNORM=0/1), then with the fused CUDA attention too
#     (SD_STUDIO_CUDA_ATTENTION=1);
#   - `sd-studio bench --profile` on the full-size random model at 512², batch 1: the UNet's
#     time by part (what to speed up next);
#   - A/B of it/s at batch 1 and 8: plain, fused GroupNorm, and the cuDNN build
#     ($BIN_CUDNN, default .gpu/sd-studio-cudnn[.xz]: build with --features cudnn into
#     /work/target-cudnn, strip and xz it the same way; libcudnn.so.9 is found in the torch
#     venv's nvidia/cudnn/lib there).
#   Device call: run(command="PART=check bash tests/gpu_bench.sh", carry=[".gpu", ".whl"], timeout_s=600)
#   - A/B variants: plain, fused (GroupNorm), fused-attn (GroupNorm + attention), cudnn,
#     cudnn-fused.
#   Files back: $OUT/check.log, $OUT/parity-{gn0,gn1,attn}.json, $OUT/ab.jsonl.
#
# Environment: BIN (default .gpu/sd-studio), PART (bench or check), COMPILE=1, COMPILE_MODE (default reduce-overhead),
# COMPILE_BATCHES (default 1,8), TOTAL (seconds for this whole script, default 560: the
# benchmark gets what setup left and is stopped with SIGTERM then, printing what it has),
# BATCHES (default 1,4,8), RUNS (default 3), STEPS (default 20), SIZE (default 512),
# EXTRA (more bench_diffusers.py arguments), OUT (default /tmp/gpu-bench-out).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-/tmp/gpu-bench-out}"
mkdir -p "$OUT"
PY=python3
T0=$(date +%s)
BIN="${BIN:-.gpu/sd-studio}"
unxz_to() {  # unxz_to FILE.xz DEST: python3's lzma (no xz binary needed there)
  $PY -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
    "$1" "$2" && chmod +x "$2"
}
if [ ! -f "$BIN" ] && [ -f "$BIN.xz" ]; then
  echo "unpacking $BIN.xz to /tmp/sd-studio"
  unxz_to "$BIN.xz" /tmp/sd-studio && BIN=/tmp/sd-studio
fi
BIN_CUDNN="${BIN_CUDNN:-.gpu/sd-studio-cudnn}"
if [ ! -f "$BIN_CUDNN" ] && [ -f "$BIN_CUDNN.xz" ]; then
  echo "unpacking $BIN_CUDNN.xz to /tmp/sd-studio-cudnn"
  unxz_to "$BIN_CUDNN.xz" /tmp/sd-studio-cudnn && BIN_CUDNN=/tmp/sd-studio-cudnn
fi
TOTAL="${TOTAL:-560}"
say() { echo "== $* ($(( $(date +%s) - T0 )) s)"; }

{
  say "wheels"
  if ls .whl/*.whl >/dev/null 2>&1; then
    ls -l .whl/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || { echo "wheel install failed"; exit 1; }
  else
    echo "no .whl/*.whl: diffusers must already be importable (carry .whl, see the top of this file)"
  fi
  $PY -c "import diffusers, transformers, torch; print('diffusers', diffusers.__version__, diffusers.__file__); print('transformers', transformers.__version__); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" || { echo "python packages missing"; exit 1; }

  say "CUDA libraries for sd-studio"
  # CUDA 13 libraries inside the torch virtualenv's nvidia package (nvidia/cu13/lib, ...).
  LIBS=""
  for d in $($PY -c "import nvidia; print('\n'.join(nvidia.__path__))" 2>/dev/null); do
    echo "nvidia package: $d"
    for l in $(find "$d" -maxdepth 3 -type d -name lib 2>/dev/null | sort); do
      ls "$l"/*.so* >/dev/null 2>&1 && LIBS="${LIBS:+$LIBS:}$l"
    done
  done
  # libcuda.so.1 comes with the driver; add its folder if the loader does not know it.
  if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
    for l in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/compat; do
      [ -e "$l/libcuda.so.1" ] && { LIBS="${LIBS:+$LIBS:}$l"; echo "libcuda.so.1 in $l"; break; }
    done
  fi
  export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  if [ -f "$BIN" ]; then
    chmod +x "$BIN"
    ls -l "$BIN"
    echo "ldd $BIN:"; ldd "$BIN"
    echo "not found (should be empty):"; ldd "$BIN" | grep "not found"
    for n in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13 libnvrtc.so.13; do
      printf '%-20s %s\n' "$n" "$(for l in ${LD_LIBRARY_PATH//:/ }; do [ -e "$l/$n" ] && echo "$l/$n"; done | head -1)"
    done
  else
    echo "WARNING: no sd-studio binary at $BIN (build it here, see the top of this file): diffusers only"
  fi

  say "machine"
  nvidia-smi || echo "no nvidia-smi"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  uname -a; nproc; free -g | head -2; df -h /tmp | tail -1
  command -v gcc nvcc || true
  $PY -m pip list 2>/dev/null | grep -iE '^(torch|triton|diffusers|transformers|huggingface|safetensors|tokenizers|accelerate|numpy) ' || true
} 2>&1 | tee "$OUT/env.txt"
# The block above ran in a subshell (the pipe): export again what the rest needs.
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site
LIBS=$(sed -n 's/^LD_LIBRARY_PATH=//p' "$OUT/env.txt" | tail -1)
export LD_LIBRARY_PATH="$LIBS"
$PY -c "import diffusers" 2>/dev/null || { echo "diffusers is not importable: see $OUT/env.txt"; exit 1; }

LIMIT=0  # set below, once setup and the smoke test are done
OURS=(--sd-studio "$BIN")
if [ -f "$BIN" ]; then
  say "smoke test: sd-studio on CUDA with the tiny fixture" | tee "$OUT/smoke.log"
  timeout 60 "$BIN" bench --model tests/fixtures/tiny-sd15 --device cuda --dtype f16 --width 64 \
    --height 64 --steps 2 --runs 1 --batches 1 --grid --taesd tests/fixtures/tiny-taesd \
    2>&1 | tee -a "$OUT/smoke.log"
  echo "exit status ${PIPESTATUS[0]}" | tee -a "$OUT/smoke.log"
else
  OURS=(--skip-ours)
fi

if [ "${PART:-bench}" = check ]; then
  export PYTHONUNBUFFERED=1
  {
    for v in gn0 gn1 attn; do
      gn=1; at=0
      case $v in gn0) gn=0;; attn) at=1;; esac
      say "parity on the tiny fixtures, SD_STUDIO_FUSED_GROUPNORM=$gn SD_STUDIO_CUDA_ATTENTION=$at"
      SD_STUDIO_FUSED_GROUPNORM=$gn SD_STUDIO_CUDA_ATTENTION=$at timeout 150 $PY tests/gpu_parity.py \
        --bin "$BIN" --cases "${PARITY_CASES:-24}" --out "$OUT/parity-$v.json"
      echo "exit status $?"
    done
    say "full-size random SD 1.5 (made once)"
    $PY -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; import bench_diffusers as b; b.make_model(Path('/tmp/sd15-random'))"
    COMMON=(bench --model /tmp/sd15-random --device cuda --dtype f16 --width 512 --height 512
            --steps 10 --scheduler dpm++2m-karras --guidance 7.5 --runs 2)
    say "profile, batch 1 (fused GroupNorm on)"
    SD_STUDIO_FUSED_GROUPNORM=1 timeout 120 "$BIN" "${COMMON[@]}" --batches 1 --profile > /dev/null
    : > "$OUT/ab.jsonl"
    for variant in plain fused fused-attn cudnn cudnn-fused; do
      b="$BIN"; gn=0; at=0
      case $variant in *cudnn*) b="$BIN_CUDNN";; esac
      case $variant in *fused*) gn=1;; esac
      case $variant in *attn) at=1;; esac
      [ -f "$b" ] || { echo "skip $variant: no binary $b"; continue; }
      say "A/B $variant"
      SD_STUDIO_FUSED_GROUPNORM=$gn SD_STUDIO_CUDA_ATTENTION=$at timeout 150 "$b" "${COMMON[@]}" --batches 1,8 \
        | tail -1 | $PY -c "import json, sys; j = json.loads(sys.stdin.read()); j['variant'] = '$variant'; print(json.dumps(j))" \
        >> "$OUT/ab.jsonl"
    done
    $PY - "$OUT/ab.jsonl" <<'PYEOF'
import json, sys
print(f"{'variant':<12}{'batch':>6}{'it/s':>9}{'step ms':>9}{'peak GiB':>10}")
for line in open(sys.argv[1]):
    j = json.loads(line)
    for c in j["cases"]:
        print(f"{j['variant']:<12}{c['batch']:>6}{c['it_per_s']:>9.2f}{c['step_s'] * 1e3:>9.2f}{(c['peak_gib'] or 0):>10.2f}")
PYEOF
    say "done"
  } 2>&1 | tee "$OUT/check.log"
  exit 0
fi

LIMIT=$(( TOTAL - ($(date +%s) - T0) ))
[ "$LIMIT" -lt 120 ] && LIMIT=120
ARGS=(--device cuda --size "${SIZE:-512}" --steps "${STEPS:-20}" --batches "${BATCHES:-1,4,8}"
      --grid --runs "${RUNS:-3}" --threads "$(nproc)" --model-dir /tmp/sd15-random
      --ours-timeout 300 --out "$OUT/bench.json" "${OURS[@]}")
if [ "${COMPILE:-0}" = 1 ]; then
  ARGS+=(--compile --compile-mode "${COMPILE_MODE:-reduce-overhead}"
         --compile-batches "${COMPILE_BATCHES:-1,8}" --deadline-s $((LIMIT - 30)))
fi
# shellcheck disable=SC2206 # EXTRA is split on purpose
ARGS+=(${EXTRA:-})
say "benchmark, limit $LIMIT s: $PY tests/bench_diffusers.py ${ARGS[*]}" | tee "$OUT/bench.log"
export PYTHONUNBUFFERED=1
# SIGTERM after LIMIT s: the script stops, prints the table and saves what it has
# (SIGKILL 15 s later if it does not).
timeout -s TERM -k 15 "$LIMIT" $PY tests/bench_diffusers.py "${ARGS[@]}" 2>&1 | tee -a "$OUT/bench.log"
rc=${PIPESTATUS[0]}
say "done, exit status $rc" | tee -a "$OUT/bench.log"
ls -l "$OUT"
exit "$rc"
