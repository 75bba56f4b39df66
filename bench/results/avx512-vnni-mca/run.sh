#!/usr/bin/env bash
# Cycles per step of each loop in loops.c, llvm-mca's estimate (Debian: apt-get install llvm-19), for one and four
# activation rows, on the CPU models named: "cpu mc loop bytes cycles bytes/cycle". Run from this folder.
set -euo pipefail
out=$(mktemp -d)
for mc in 1 4; do
    gcc -O3 -march=sapphirerapids -DMC=$mc -S loops.c -o "$out/avx512-$mc.s"
    gcc -O3 -march=alderlake -DMC=$mc -S loops.c -o "$out/avx2-$mc.s"   # AVX2 + AVX-VNNI, no AVX-512
    for cpu in sapphirerapids znver4 alderlake znver3; do
        for s in "$out"/avx512-$mc.s "$out"/avx2-$mc.s; do
            case "$cpu:$s" in (alderlake:*avx512*|znver3:*avx512*) continue;; esac
            llvm-mca-19 -mcpu=$cpu -iterations=200 "$s" 2>/dev/null \
                | awk -v cpu=$cpu -v mc=$mc '/Code Region - /{split($NF, a, ":"); name=a[1]; bytes=a[2]}
                      /^Total Cycles:/{c=$3/200; printf "%-15s %d %-36s %4d %6.2f %6.2f\n", cpu, mc, name, bytes, c, bytes/c}'
        done
    done
done
rm -r "$out"
