#!/usr/bin/env bash
# Make the weights `rdm demo` ships with: the demo CLIP and the demo RDM, trained on toy art, copied
# into rdm/assets/demo/rdm/ (an rdm model folder holding its CLIP in clip/, open_clip's local-dir format). Reproducible:
# every step is seeded, and the toy art is a pure function of (seed, index).
#
#   bash scripts/train_demo.sh                                   # CPU defaults (hours on 2 cores)
#   CLIP_STEPS=5000 RDM_STEPS=20000 RDM_BATCH=128 DEVICE=cuda CLIP_WORKERS=12 bash scripts/train_demo.sh
#   CLIP_FROM=rdm/assets/demo/rdm/clip RDM_INIT=rdm/assets/demo/rdm bash scripts/train_demo.sh   # fine-tune the bundled
#                                                                model onto the leak-free schedule (CPU: ~1 h)
#   SCHEDULE=legacy CLIP_FROM=rdm/assets/demo/rdm/clip bash scripts/train_demo.sh   # the previous bundled model
#
# The schedule (SCHEDULE=leak-free, the default): the small preset's DDPM betas rescaled to zero terminal SNR,
# v-prediction and trailing timesteps (Lin et al. 2024), so that the model cannot read the image's colour from
# the initial noise (the previous model's samples sat on a seed-dependent tint), plus --neighbour-drop 0.1 so
# that the query-only context of --style-scale is one the model has seen.
#
# Settings (environment variables):
RUN=${RUN:-runs/demo}                  # work folder: toy art, CLIP, databases, training cache, RDM run
N_TRAIN=${N_TRAIN:-24000}              # toy-art training images (all six styles, indices 0 .. N_TRAIN-1)
SIZE=${SIZE:-64}                       # image side; the `small` preset is 64 px
STYLE_CAPTIONS=${STYLE_CAPTIONS:-0}    # share of the RDM's training captions that name the style: 0, so that the
#                                        style can only come from the neighbours (the CLIP draws its own captions)
DEVICE=${DEVICE:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
CLIP_FROM=${CLIP_FROM:-}               # an existing demo CLIP folder to reuse instead of training one, e.g.
#                                        rdm/assets/demo/rdm/clip (to retrain only the RDM)
CLIP_STEPS=${CLIP_STEPS:-3000}         # demo CLIP optimiser steps (rdm/demo/clip.py); the bundled CLIP: 3000
CLIP_BATCH=${CLIP_BATCH:-128}          # image/caption pairs per CLIP step; the bundled CLIP: 128
CLIP_WORKERS=${CLIP_WORKERS:-1}        # processes rendering the CLIP's toy art on the fly
SCHEDULE=${SCHEDULE:-leak-free}        # leak-free (zero terminal SNR, v-prediction, trailing) or legacy (the
#                                        previous bundled model: epsilon, 3000 steps on ldm then 2250 on ddpm)
RDM_INIT=${RDM_INIT:-}                 # leak-free only: fine-tune this rdm model folder instead of training from
#                                        scratch, e.g. rdm/assets/demo/rdm (its prediction type changes to v)
RDM_STEPS=${RDM_STEPS:-3000}           # RDM optimiser steps: from scratch (or legacy stage 1, ldm schedule)
RDM_FT_STEPS=${RDM_FT_STEPS:-2250}     # fine-tuning steps: from RDM_INIT (or legacy stage 2, onto ddpm); 0 skips
NEIGHBOUR_DROP=${NEIGHBOUR_DROP:-0.1}  # leak-free only: share of steps with the neighbours alone zeroed
RDM_BATCH=${RDM_BATCH:-32}             # RDM images per step
PRECISION=${PRECISION:-bf16}           # RDM mixed precision: no, bf16 (AVX512-BF16/AMX CPUs, Ampere+ GPUs), fp16
THREADS=${THREADS:-2}                  # torch CPU threads for the RDM (1 is fastest on a busy, shared CPU)
SEED=${SEED:-0}                        # CLIP initialisation and RDM training seed
CLIP_EVAL=${CLIP_EVAL:-1}              # 0: skip the CLIP's zero-shot evaluation after training
MAX_MB=${MAX_MB:-40}                   # the shipped weights must fit in this many MB (10^6 bytes)
ASSETS=${ASSETS:-rdm/assets/demo}      # where the weights go (relative to the checkout's root)
DEMO_ARGS=${DEMO_ARGS:-}               # extra `rdm demo` options for the closing check, e.g. "--steps 5"
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -e "$RUN" ]; then
    echo "error: $RUN already exists; remove it or choose another RUN=folder" >&2
    exit 1
fi
mkdir -p "$RUN"
echo "device $DEVICE; run folder $RUN"

# 1. Toy-art training set: every style, content-only captions in metadata.jsonl
rdm toyart "$RUN/toyart" -n "$N_TRAIN" --size "$SIZE" --seed 0 --style-caption-prob "$STYLE_CAPTIONS"

# 2. The demo CLIP (renders its own toy art on the fly, from the same seed), or a copy of CLIP_FROM
if [ -n "$CLIP_FROM" ]; then
    mkdir -p "$RUN/clip"
    cp "$CLIP_FROM"/open_clip_config.json "$CLIP_FROM"/open_clip_model.safetensors "$RUN/clip/"
    if [ -f "$CLIP_FROM/train_info.json" ]; then cp "$CLIP_FROM/train_info.json" "$RUN/clip/"; fi
else
    eval_flag=(); [ "$CLIP_EVAL" = 0 ] && eval_flag=(--no-eval)
    python scripts/train_demo_clip.py --out "$RUN/clip" --steps "$CLIP_STEPS" --batch-size "$CLIP_BATCH" \
        --seed "$SEED" --data-seed 0 --device "$DEVICE" --workers "$CLIP_WORKERS" --save-dtype float16 "${eval_flag[@]}"
fi

# 3. The retrieval database of the training set, embedded with that CLIP: the neighbours of training
rdm build-index "$RUN/toyart" --name demo-train --clip "local-dir:$RUN/clip" --indexes "$RUN/indexes" \
    --device "$DEVICE"

# 4. The RDM: caption (text) queries, so the style has to come from the neighbours.
cpu_flag=(); [ "$DEVICE" = cpu ] && cpu_flag=(--cpu)
threads_flag=(); [ -n "$THREADS" ] && threads_flag=(--threads "$THREADS")
common=(--indexes "$RUN/indexes" train --preset small --query text --data "$RUN/toyart" --db demo-train
        --clip "local-dir:$RUN/clip" --batch-size "$RDM_BATCH" --mixed-precision "$PRECISION" --cache-dir "$RUN/cache"
        "${cpu_flag[@]}" "${threads_flag[@]}")
if [ "$SCHEDULE" = leak-free ]; then
    # The small preset's schedule: ddpm betas rescaled to zero terminal SNR, v-prediction, trailing timesteps
    # (saved in the model's scheduler config, so `rdm sample`/`rdm demo` sample with it, whichever sampler).
    leak_free=(--noise-schedule ddpm --prediction-type v_prediction --zero-snr --timestep-spacing trailing
               --neighbour-drop "$NEIGHBOUR_DROP")
    if [ -n "$RDM_INIT" ]; then
        rdm "${common[@]}" "${leak_free[@]}" --out "$RUN/rdm" --init "$RDM_INIT" --steps "$RDM_FT_STEPS" \
            --seed $((SEED + 2))
    else
        rdm "${common[@]}" "${leak_free[@]}" --out "$RUN/rdm" --steps "$RDM_STEPS" --seed "$SEED"
    fi
    final="$RUN/rdm/model"
elif [ "$SCHEDULE" = legacy ]; then
    # The previous bundled model: 3000 steps on CompVis' latent schedule, whose samples in pixel space came out
    # tinted (it leaves 0.028 of the signal at t = T; see NOISE_SCHEDULES in rdm/train/loop.py), then fine-tuned
    # onto DDPM's pixel schedule, epsilon prediction throughout.
    legacy=(--prediction-type epsilon --no-zero-snr --timestep-spacing leading)
    rdm "${common[@]}" "${legacy[@]}" --out "$RUN/rdm" --steps "$RDM_STEPS" --seed "$SEED" --noise-schedule ldm
    final="$RUN/rdm/model"
    if [ "$RDM_FT_STEPS" -gt 0 ]; then
        rdm "${common[@]}" "${legacy[@]}" --out "$RUN/rdm-ddpm" --init "$RUN/rdm/model" --noise-schedule ddpm \
            --steps "$RDM_FT_STEPS" --seed $((SEED + 1))
        final="$RUN/rdm-ddpm/model"
    fi
else
    echo "error: SCHEDULE must be leak-free or legacy, got $SCHEDULE" >&2
    exit 1
fi

# 5. Ship: configs and safetensors only, within the size limit
mkdir -p "$ASSETS/rdm/clip"
find "$ASSETS/rdm" -mindepth 1 -type f ! -name README.md -delete   # each folder's README.md stays
cp -r "$final/." "$ASSETS/rdm/"   # model_index.json, rdm_config.json, unet/, scheduler/
cp "$RUN/clip/open_clip_config.json" "$RUN/clip/open_clip_model.safetensors" "$ASSETS/rdm/clip/"
if [ -f "$RUN/clip/train_info.json" ]; then cp "$RUN/clip/train_info.json" "$ASSETS/rdm/clip/"; fi
python - "$ASSETS" <<'EOF'
import json, sys
from pathlib import Path

from rdm.embed.embedder import Embedder

# The model records the CLIP's weights checksum, which is what is checked; its id would be this machine's
# absolute path, so it is replaced by "local-dir:clip", relative to the model folder (a copy of it loads anywhere).
# The sampler settings rdm demo and the blind evaluation use are recorded as the model's own.
assets = Path(sys.argv[1])
config_path = assets / "rdm" / "rdm_config.json"
config = json.loads(config_path.read_text())
bundled = Embedder.load(f"local-dir:{assets / 'rdm' / 'clip'}", device="cpu", dtype="float32").identity
if bundled.weights_sha256 != config["embedder"]["weights_sha256"]:
    sys.exit(f"error: the bundled CLIP is not the one {config_path} was trained with")
config["embedder"]["model"] = "local-dir:clip"
config["sampling"] = {"scheduler": None, "num_inference_steps": 8, "guidance_scale": 3.0, "guidance_rescale": 0.0,
                      "style_scale": None, "eta": 0.0}
config_path.write_text(json.dumps(config, indent=1) + "\n")
EOF
other=$(find "$ASSETS/rdm" -type f ! -name '*.json' ! -name '*.safetensors' ! -name README.md)
if [ -n "$other" ]; then
    echo "error: only configs, safetensors and READMEs may ship, found: $other" >&2
    exit 1
fi
bytes=$(find "$ASSETS/rdm" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
echo "bundled weights in $ASSETS: $(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1e6}') MB (limit $MAX_MB MB)"
if [ "$bytes" -gt $((MAX_MB * 1000000)) ]; then
    echo "error: the demo weights exceed $MAX_MB MB" >&2
    exit 1
fi

# 6. The demo itself, from the bundled weights
# shellcheck disable=SC2086
rdm demo --out "$RUN/demo" --model "$ASSETS/rdm" $DEMO_ARGS
