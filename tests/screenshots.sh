#!/usr/bin/env bash
# Runs the real studio window under Xvfb on the tiny model, generates a grid and saves
# screenshots (mid-generation, finished, large view) into screenshots/, then prints frame
# and preview timings as one JSON line. Not run by CI.
#
# Needs: apt-get install xvfb mesa-vulkan-drivers libgl1-mesa-dri libegl1 libxkbcommon-x11-0
# (wgpu runs on Mesa's lavapipe software Vulkan; pass RENDERER=glow for llvmpipe OpenGL).
# PREVIEW=Taesd|Linear|Off and PREVIEW_EVERY=N choose the previews; OUT the folder.
# COMPARE=1 runs compare mode instead: tiny-sd15 against the tiny SD 2.x-shaped fixture, one
# row each, same seeds. LORA=1 sets the fixture LoRA and embeddings folders and puts a LoRA
# tag and an embedding in the prompt (the LoRA panel shows what the folder holds).
# VARY=1 shows "Vary around this" as it leaves the grid: every cell seed 1234, variation
# seeds 1234 + i at strength 0.2 (cell 1 is the image itself).
# LIVE=1 turns live mode on (the grid regenerates after every edit; nothing saved).
# HIRES=1 turns Hires. fix on (128² upscaled to 256², Latent, strength 0.6).
# CONTROLNET=1 turns the ControlNet panel on: the tiny fixture ControlNet steered by the
# Canny edges of the fixture photograph.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-screenshots}
renderer=${RENDERER:-wgpu}
bin=${BIN:-target/release/sd-studio}
[ -x "$bin" ] || cargo build --release
mkdir -p "$out"
state=$(mktemp -d)
compare=""
if [ -n "${COMPARE:-}" ]; then
  compare=', "compare": {"enabled": true, "models": ["tests/fixtures/tiny-sd15", "tests/fixtures/tiny-sd2v"]}'
fi
prompt="a lighthouse on a cliff at dawn, oil painting"
folders=""
if [ -n "${LORA:-}" ]; then
  prompt="a lighthouse on a cliff at dawn, oil painting, tinyemb, <lora:kohya_locon:0.8>"
  folders=', "lora_dir": "tests/fixtures/lora", "embeddings_dir": "tests/fixtures/embeddings"'
fi
control=""
if [ -n "${CONTROLNET:-}" ]; then
  control=', "control": {"enabled": true, "model": "tests/fixtures/controlnet/tiny-cn-sd15", "image": "'"$PWD"'/tests/fixtures/refs/canny/astronaut.png", "preprocess": "canny", "scale": 1.0, "start": 0.0, "end": 1.0}'
  prompt="an astronaut, oil painting"
fi
if [ -n "${VARY:-}" ]; then
  control="$control"', "seed_mode": "Same", "variation_seed": 1234, "variation_strength": 0.2'
fi
if [ -n "${LIVE:-}" ]; then
  folders="$folders"', "live": true'
fi
if [ -n "${HIRES:-}" ]; then
  control="$control"', "hires": {"enabled": true, "upscaler": "latent", "scale": 2.0, "steps": 0, "strength": 0.6}'
fi
# 128×128 keeps the tiny model quick on a CPU; 16 steps leave time to watch it form.
cat > "$state/state.json" <<JSON
{"settings": {"preview": "${PREVIEW:-Taesd}", "preview_every": ${PREVIEW_EVERY:-1}$folders},
 "params": {"prompt": "$prompt",
            "negative_prompt": "blurry, low quality", "seed": 1234, "seed_locked": true,
            "sampler": "euler-a", "steps": 16, "cfg": 7.0, "width": 128, "height": 128,
            "count": 8$control}$compare}
JSON
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$state}
HF_HUB_OFFLINE=1 xvfb-run -a -s "-screen 0 1280x860x24" \
  "$bin" studio --model tests/fixtures/tiny-sd15 --renderer "$renderer" \
  --state-file "$state/state.json" --auto-generate \
  --taesd "${TAESD:-tests/fixtures/tiny-taesd}" --out "$state/outputs" \
  --screenshot-dir "$out" "$@"
rm -rf "$state"
