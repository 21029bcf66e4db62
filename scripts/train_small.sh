#!/usr/bin/env bash
# The longer `small` run (issue 8) on 2 CPU cores, about 45 minutes uncontended:
#   stage 1: projector + FMVR on reading-order captions of 4800 built-in scenes in SmolLM2's own
#            ChatML template ("Describe the image."; an alignment learned in LLaVA's plain template
#            does not carry over to ChatML), at 36 and 9 visual tokens only (cheap steps), 600 steps;
#   stage 2: + LoRA on SmolLM2, every question of 800 scenes as independent blocks plus the
#            caption as one more block (--bench-kind mix), at 36 and 9 tokens, 200 steps;
#   then accuracy per budget and category on 40 held-out test scenes, and the image-use check
#   (loss with each scene's own image vs another's). The quick demo (make demo) is shorter.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/small}
BF16=$(grep -qE 'amx_bf16|avx512_bf16' /proc/cpuinfo 2>/dev/null && echo --bf16 || echo --no-bf16)
export HF_HUB_OFFLINE=1
"$PY" -m train --preset small --stage stage1 --template chat --out "$OUT/stage1" --steps 600 --batch-size 8 \
    --bench-n 4800 --lr 2e-3 --budget-mode random --tokens 36,9 "$BF16" --log-every 10 --save-every 200 --skip-if-done
"$PY" -m train --stage stage2 --init "$OUT/stage1/final" --out "$OUT/stage2" --steps 200 --batch-size 4 \
    --bench-n 2000 --bench-seed 1 --bench-kind mix --budget-mode random --tokens 36,9 --cache-vision "$BF16" \
    --lora --lora-alpha 128 --lr 5e-4 --projector-lr 1e-4 --log-every 5 --save-every 100 --skip-if-done
"$PY" -m train.eval --checkpoint "$OUT/stage2/final" --bench-n 40 --split test --tokens all --out "$OUT/eval.json"
"$PY" benchmarks/image_use.py --checkpoint "$OUT/stage2/final" --kind qa --out "$OUT" --name small_stage2
