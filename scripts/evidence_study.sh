#!/usr/bin/env bash
# The FMVR-vs-M3 study (docs/RESULTS.md, "Training evidence"), end to end, as cached and resumable runs:
#   1. val: one seed of m3-frozen and of fmvr-frozen per candidate --pyramid-lr (the FMVR blocks'
#      own learning rate, the one knob FMVR has and M3 has not);
#   2. the choice: the candidate whose fmvr-frozen val accuracy (all categories) averaged over 36
#      and 9 tokens is highest (ties: the smaller rate), written to $OUT/evidence_choice.json;
#   3. test: the frozen-LM arms, then the LoRA arms, at the chosen rate, seeds $SEEDS, on the test split's own
#      benchmark seed, $TEST_N scenes (x 5 questions).
# Run it from a frozen checkout (git worktree add --detach ...): every run records its code
# version and a rerun reuses only runs of the same code. A killed study resumes where it stopped.
#
#   RUNS=/work/study-runs OUT=benchmarks/results bash scripts/evidence_study.sh
set -euo pipefail
PY=${PY:-python}
RUNS=${RUNS:-runs/evidence}
OUT=${OUT:-benchmarks/results}
CANDIDATES=${CANDIDATES:-1e-3 3e-3 1e-2}
VAL_N=${VAL_N:-40}
TEST_N=${TEST_N:-70}
SEEDS=${SEEDS:-0,1,2}
COMMON=(--variant detail --start-steps "${START_STEPS:-160}" --adapt-steps "${ADAPT_STEPS:-80}" --runs "$RUNS" --out "$OUT")

for lr in $CANDIDATES; do
    arms=fmvr-frozen
    [ "$lr" = "${CANDIDATES%% *}" ] && arms=fmvr-frozen,m3-frozen
    "$PY" benchmarks/evidence.py "${COMMON[@]}" --split val --eval-n "$VAL_N" --seeds 0 --arms "$arms" \
        --pyramid-lr "$lr" --name "evidence_small_detail_val_plr$lr"
done

chosen=$("$PY" - "$OUT" $CANDIDATES <<'EOF'
import json, subprocess, sys
from pathlib import Path

out, cands = Path(sys.argv[1]), sys.argv[2:]
score = {}
for lr in cands:
    rows = json.loads((out / f"evidence_small_detail_val_plr{lr}.json").read_text())["accuracy"]
    got = [r["accuracy"] for r in rows if r["arm"] == "fmvr-frozen" and r["category"] == "all" and r["tokens"] in (36, 9)]
    score[lr] = sum(got) / len(got)
best = max(sorted(cands, key=float), key=lambda lr: score[lr])  # stable: the smaller rate wins a tie
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
(out / "evidence_choice.json").write_text(json.dumps(
    {"rule": "fmvr-frozen val accuracy, all categories, mean of 36 and 9 tokens", "scores": score, "pyramid_lr": best,
     "command": "bash scripts/evidence_study.sh", "commit": commit or None}, indent=1) + "\n")
print(best)
EOF
)
echo "chosen --pyramid-lr $chosen"

# The frozen-LM arms first (every seed), then the LoRA arms: the second call reuses the first's
# runs and rewrites the summary with all four arms, so a study cut short still reports whole arms.
"$PY" benchmarks/evidence.py "${COMMON[@]}" --split test --eval-n "$TEST_N" --seeds "$SEEDS" \
    --arms fmvr-frozen,m3-frozen --pyramid-lr "$chosen"
"$PY" benchmarks/evidence.py "${COMMON[@]}" --split test --eval-n "$TEST_N" --seeds "$SEEDS" \
    --arms fmvr-frozen,m3-frozen,fmvr-lora,m3-lora --pyramid-lr "$chosen"
