#!/usr/bin/env bash
# The quick-start demo (`make demo`): the whole flow on the built-in tiny model, CPU only,
# no downloads. Each step is cached under runs/demo, so a second run is quick.
#   1. the model: a real photo through every visual-token budget, FLOPs per budget
#   2. training on the built-in visual benchmark, then accuracy per budget and category
#   3. export: ONNX vision graph (all budgets, one shared trunk) + int8 ONNX decoder
#   4. the torch-free runtime: one question at three latency budgets, the budget it picks
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${DEMO_DIR:-runs/demo}
STEPS=${DEMO_STEPS:-600}
mkdir -p "$OUT"
say() { printf '\n==== %s\n' "$*"; }

say "1/4 the tiny FMVR-LLaVA on a real photo (python -m fmvr.demo)"
"$PY" -m fmvr.demo

say "2/4 training on the built-in benchmark ($STEPS steps; cached in $OUT/train)"
"$PY" -m train --out "$OUT/train" --steps "$STEPS" --batch-size 6 --bench-n 1200 --lr 1e-3 --schedule constant \
    --budget-mode random --cache-vision --skip-if-done
"$PY" -m train.eval --ckpt "$OUT/train/final" --bench-n 40 --out "$OUT/eval.json" --reuse

say "3/4 export to a bundle (cached in $OUT/bundle)"
if [ -f "$OUT/bundle/manifest.json" ] && [ "$OUT/bundle/manifest.json" -nt "$OUT/train/final/model.safetensors" ]; then
    echo "bundle $OUT/bundle is up to date (delete it to export again)"
else
    "$PY" -m export --checkpoint "$OUT/train/final" --out "$OUT/bundle" --llm int8 --force
fi

say "4/4 the torch-free runtime picks a budget per latency budget"
ls "$OUT"/bundle/profile-*.json >/dev/null 2>&1 || "$PY" -m runtime profile --bundle "$OUT/bundle"
# Three deadlines from this device's own predictions: below the cheapest budget, between the
# 36- and 144-token budgets, and room for all 576 tokens.
read -r TIGHT MID LOOSE < <(PYTHONPATH=. "$PY" scripts/demo_runtime.py "$OUT")
"$PY" -m runtime ask --bundle "$OUT/bundle" --image "$OUT/scene.png" --prompt "$(cat "$OUT/question.txt")" \
    --latency-ms "$TIGHT" "$MID" "$LOOSE" --max-new-tokens 8
