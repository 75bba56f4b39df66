#!/usr/bin/env bash
# The whole path on a 2-core CPU in about 30 minutes: the Python standard library's source and reference topics
# (PSF License, nothing downloaded) -> a 4096-id byte-level BPE tokenizer -> a 3.5M-parameter Qwen3.5-architecture
# model pretrained for 3000 steps -> chat fine-tuning on docstring questions -> held-out loss, samples, answers.
#
#   bash runs/demo.sh [OUT]            # default OUT: /tmp/qwenlite-demo; the report is OUT/report.md
#   bash runs/demo.sh OUT --quick      # about a minute, a smoke test
#   bash runs/demo.sh OUT --resume     # continue an interrupted run
#
# Then: qwenlite run OUT/model "def read_config(path):" --raw --temperature 0.7
#       qwenlite chat OUT/chat
set -euo pipefail
# Threads that sleep instead of spinning while they wait. On cores that other processes also use, libgomp's
# default spin-wait made training steps 2x (one busy neighbour) to 50x (two) slower here; on an idle machine
# PASSIVE costs about 25% (0.60 s a step instead of 0.45 s). OMP_WAIT_POLICY=ACTIVE bash runs/demo.sh on a
# machine of your own.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
out="${1:-/tmp/qwenlite-demo}"
shift || true
qwenlite train demo --out "$out" "$@"
