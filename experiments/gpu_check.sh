#!/usr/bin/env bash
# GPU check (issue 21): semid's default design and a plain SASRec of the same width, trained side by side on one
# GPU on Beauty for the same wall-clock budget; prints steps/s, epochs and test Recall@10 / NDCG@10 of both.
#
#   bash experiments/gpu_check.sh [DATA] [BUDGET]      # defaults: /work/shared/data/beauty 00:04:00
#
# Needs a CUDA machine, one call, under 8 minutes (codebooks ~1 min on the CPU, 4 min of training, evaluation).
# The plain SASRec is experiments/sasrec.py (wall-clock budget here: --clock wall), which writes OUT/result.json.
# NOT RUN YET: no GPU was lent to the session that wrote it.
set -euo pipefail
DATA=${1:-/work/shared/data/beauty}
BUDGET=${2:-00:04:00}
OUT=${OUT:-$(mktemp -d)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$OUT/ids/semantic_ids.npz" ] || python -m semid_cli fit-codebooks --embeddings "$DATA/item_emb_minilm.npy" \
    --out "$OUT/ids" --no-progress > "$OUT/codebooks.log"
python -m semid_cli train --data "$DATA" --ids "$OUT/ids" --out "$OUT/semid" --max-time "$BUDGET" --accelerator gpu \
    --no-progress --final-val-users 0 > "$OUT/semid.log" 2>&1 &
SEMID=$!
python -m experiments.sasrec --data "$DATA" --max-time "$BUDGET" --clock wall --device cuda --out "$OUT/sasrec" > "$OUT/sasrec.log" 2>&1 &
SASREC=$!
wait $SEMID || { tail -20 "$OUT/semid.log"; exit 1; }
wait $SASREC || { tail -20 "$OUT/sasrec.log"; exit 1; }
python -m semid_cli evaluate --run "$OUT/semid" --split test --device cuda --no-progress > "$OUT/semid_test.log"
python - "$OUT" <<'PY'
import json, sys, pathlib, yaml
out = pathlib.Path(sys.argv[1])
cfg = yaml.safe_load((out / "semid" / "config.yaml").read_text())
test = json.loads((out / "semid" / "metrics_test.json").read_text())
m = test.get("metrics", test)
s = json.loads((out / "sasrec" / "result.json").read_text())
rows = [("semid (default)", cfg["steps"] / cfg["train_seconds"], cfg["epochs"], m["recall@10"], m["ndcg@10"]),
        ("SASRec", s["steps"] / s["train_s"], s["epochs"], s["test"]["recall@10"], s["test"]["ndcg@10"])]
print(f"{'model':<16} {'steps/s':>8} {'epochs':>7} {'R@10':>7} {'N@10':>7}")
for name, rate, ep, r, n in rows:
    print(f"{name:<16} {rate:8.1f} {ep:7.1f} {r:7.4f} {n:7.4f}")
print(f"semid / SASRec steps/s: {rows[0][1] / rows[1][1]:.2f} (target >= 0.5)")
PY
