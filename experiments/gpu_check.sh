#!/usr/bin/env bash
# GPU check (issue 21): semid's default design and a plain SASRec of the same width, trained side by side on one
# GPU on Beauty for the same wall-clock budget; prints steps/s, epochs and test Recall@10 / NDCG@10 of both.
#
#   bash experiments/gpu_check.sh [DATA] [BUDGET]      # defaults: the first Beauty folder found, 00:04:00
#
# DATA defaults to the first of shared/data/beauty (inside the checkout), ../shared/data/beauty (beside it) and
# /work/shared/data/beauty that holds sequences.txt. A lent device machine gets only the checkout: link the data in
# under an ignored name and carry the files through the link (they are read there, never committed), e.g.
#   ln -s ../shared/data/beauty gpu_data && echo gpu_data >> .git/info/exclude
#   run: bash experiments/gpu_check.sh gpu_data   carry: gpu_data/sequences.txt gpu_data/items.jsonl
#        gpu_data/item_emb_minilm.npy
#
# Needs a CUDA machine, one call, under 8 minutes (codebooks ~1 min on the CPU, 4 min of training, evaluation).
# The plain SASRec is experiments/sasrec.py (wall-clock budget here: --clock wall), which writes OUT/result.json.
# NOT RUN YET: no GPU was lent to the session that wrote it.
set -euo pipefail
if [ $# -ge 1 ]; then DATA=$1; else
    DATA=""
    for d in shared/data/beauty ../shared/data/beauty /work/shared/data/beauty; do  # loop over candidate folders
        if [ -f "$d/sequences.txt" ]; then DATA=$d; break; fi
    done
    [ -n "$DATA" ] || { echo "no Beauty data found: pass its folder as the first argument" >&2; exit 2; }
fi
[ -f "$DATA/sequences.txt" ] || { echo "$DATA: no sequences.txt there (the Beauty folder?)" >&2; exit 2; }
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
