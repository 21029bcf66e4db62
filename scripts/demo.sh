#!/usr/bin/env bash
# The quick-start demo (`make demo`): the whole flow on the `small` preset, CPU only, no hub
# downloads (EfficientNet-Lite0 and SmolLM2-135M weights come from pinned pip packages).
# Each step is cached under runs/demo, so a second run takes seconds.
#   1. the model: a real photo through every visual-token budget, FLOPs per budget
#   2. training on the built-in benchmark's `detail` variant (10-16 small objects, so pooling to
#      fewer tokens loses what the questions ask): stage ground (projector + FMVR regressed onto
#      word grids, no LM) and stage 2 (LoRA on SmolLM2 over the questions), then accuracy per budget
#      and category on the held-out test split
#   3. export: ONNX vision graph (all budgets, one shared trunk) + int8 ONNX decoder
#   4. the torch-free runtime: questions at three latency budgets, the budget it picks; this device's
#      budget card (time and accuracy per budget)
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${DEMO_DIR:-runs/demo}
GROUND_STEPS=${DEMO_GROUND_STEPS:-150}
STEPS=${DEMO_STEPS:-60}
EVAL_N=${DEMO_EVAL_N:-40}
mkdir -p "$OUT"
say() { printf '\n==== %s\n' "$*"; }
# bf16 autocast where the CPU has bf16 matrix units (AMX / AVX512-BF16): ~1.7x faster steps
BF16=$(grep -qE 'amx_bf16|avx512_bf16' /proc/cpuinfo 2>/dev/null && echo --bf16 || echo --no-bf16)

say "1/4 the small FMVR model on a real photo (python -m fmvr.demo)"
"$PY" -m fmvr.demo --preset small

say "2/4 training on the built-in benchmark (cached in $OUT)"
# stage ground: the projector and FMVR learn to hand the LM a grid of word embeddings (the colour
# and shape of every object a token's window touches) at all four budgets, no LM pass (train/ground.py);
# stage 2: LoRA on the questions, one budget of 576/144/36/9 a step, 5 questions per scene (one of
# each category: a third of the tokens of all 14), projector nearly frozen (train/README.md).
"$PY" -m train --preset small --stage ground --out "$OUT/ground" --steps "$GROUND_STEPS" --batch-size 32 \
    --bench-n 600 --bench-variant detail --lr 1e-3 --tokens 576,144,36,9 "$BF16" --skip-if-done
"$PY" -m train --stage stage2 --init "$OUT/ground/final" --out "$OUT/train" --steps "$STEPS" --batch-size 8 \
    --bench-n 600 --bench-seed 1 --bench-variant detail --bench-kind qa --bench-questions 5 --lora \
    --lora-alpha 128 --lr 5e-4 --projector-lr 1e-5 --schedule constant --budget-mode random \
    --tokens 576,144,36,9 --cache-vision "$BF16" --skip-if-done
"$PY" -m train.eval --checkpoint "$OUT/train/final" --bench-variant detail --bench-n "$EVAL_N" \
    --out "$OUT/eval.json" --reuse

say "3/4 export to a bundle (cached in $OUT/bundle)"
if [ -f "$OUT/bundle/manifest.json" ] && [ "$OUT/bundle/manifest.json" -nt "$OUT/train/final/model.safetensors" ]; then
    echo "bundle $OUT/bundle is up to date (delete it to export again)"
else
    "$PY" -m export --checkpoint "$OUT/train/final" --out "$OUT/bundle" --quant int8 --force
fi

say "4/4 the torch-free runtime picks a budget per latency budget"
ls "$OUT"/bundle/profile-*.json >/dev/null 2>&1 || "$PY" -m runtime profile --bundle "$OUT/bundle"
# Three deadlines from this device's own predictions: below the cheapest budget, between the
# 36- and 144-token budgets, and room for all 576 tokens; two scenes, so the answers follow the image.
read -r TIGHT MID LOOSE < <(PYTHONPATH=. "$PY" scripts/demo_runtime.py "$OUT" detail)
for scene in 0 1; do
    "$PY" -m runtime ask --bundle "$OUT/bundle" --image "$OUT/scene$scene.png" \
        --prompt "$(cat "$OUT/question$scene.txt")" --latency-ms "$TIGHT" "$MID" "$LOOSE" --max-new-tokens 8
done
# What each budget buys on this device: p50/p95 per stage (measured here) and accuracy per category
# (step 2's evaluation; `--bench-n N` instead asks the benchmark through the runtime: ~2 min for 10 scenes here).
"$PY" -m runtime card --bundle "$OUT/bundle" --accuracy "$OUT/eval.json" --runs 3 --decode-tokens 4
