#!/usr/bin/env bash
# `qwenlite report` on the demo model (runs/demo.sh): fp32, int8 on load, and llama.cpp's Q8_0 / Q4_0 as GGUF
# files, scored on local tasks made from the demo's held-out questions (bench/demo_tasks.py) and their answers.
#   bash bench/demo_report.sh [OUT] [--quick]     # OUT: the demo's folder (made first if it holds no model)
# The report lands in OUT/variants (or $REPORT). int4 on load is left out: the demo's layers are not a
# multiple of qwenlite's int4 group of 128 (192 wide, 96 with --quick); GGUF Q4_0 (groups of 32) stands for 4 bits.
set -euo pipefail
out="${1:-/tmp/qwenlite-demo}"
shift || true
[ -f "$out/model/config.json" ] || bash runs/demo.sh "$out" "$@"
python bench/demo_tasks.py "$out"
for q in q8_0 q4_0; do
    qwenlite convert "$out/model" --to gguf "$out/model-$q.gguf" --dtype "$q"
done
qwenlite report "$out/model" --variants "fp32,int8,$out/model-q8_0.gguf,$out/model-q4_0.gguf" \
    --text "$out/heldout.txt" --tasks docstring_mc --include-path "$out/tasks" --ctx 256 --out "${REPORT:-$out/variants}"
