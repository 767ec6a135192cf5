#!/bin/bash
# The embedded models' figures of issue #12, as measured for the README (2-core CPU, ~15 min):
#   bench/eval_embedded.sh CINE_MODEL CT_MODEL TRAIN_CINE OUT
# CINE_MODEL / CT_MODEL: a model folder or an embedded name (cine, ct); TRAIN_CINE: the cine model's
# training phantoms (`medgen phantom cmr4d --n 400`), for the copy screen. Fresh phantoms of seeds the
# models never saw: cine 777 (16, the reference) and 778 (8, the control); CT maps 4242 (8).
# Realism (band-passed, whole volume) and local realism of each cine set are in its
# quality-*/report.json (`medgen eval quality`); bench/eval_defaults.py, which computed a
# plain and a band-passed realism of its own, is retired.
set -euo pipefail
CINE=$1; CT=$2; TRAIN=$3; OUT=$4
mkdir -p "$OUT"
medgen phantom cmr4d --n 16 --seed 777 --out "$OUT/cine-fresh" --quiet
medgen phantom cmr4d --n 8 --seed 778 --out "$OUT/cine-fresh8" --quiet
medgen sample --model "$CINE" --n 8 --out "$OUT/cine-samples" --quiet
E="$OUT/encoder.safetensors"
for S in cine-samples cine-fresh8; do
  medgen eval memorization --train "$TRAIN" --val "$OUT/cine-fresh" --synthetic "$OUT/$S" --out "$OUT/memo-$S" --encoder "$E" --quiet
  medgen eval quality --real "$OUT/cine-fresh" --synthetic "$OUT/$S" --out "$OUT/quality-$S" --encoder "$E" --quiet
done
medgen phantom ct --n 8 --seed 4242 --shape 64 64 32 --spacing 2.8 2.8 4.0 --out "$OUT/ct-maps" --quiet
medgen sample --model "$CT" --masks "$OUT/ct-maps/masks" --n 8 --out "$OUT/ct-samples" --quiet
python "$(dirname "$0")/ct_dice.py" "$OUT/ct-samples"
