#!/usr/bin/env bash
# The committed Fashion-MNIST grid (reduced CPU protocol, preset "cpu"), on two workers that share
# the grid through lock files (each run and each pretraining is claimed by one worker):
#   bash benchmarks/fmnist_grid.sh        # from the repository root; logs in out/fmnist/
# then: python benchmarks/tables.py --records out/fmnist/records --out benchmarks/results/fashion-mnist
set -u
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out/fmnist}
mkdir -p "$OUT"
R="$PY benchmarks/run.py --dataset fashion-mnist --preset cpu --threads 1 --out $OUT"
(
  $R --model resnet20-narrow --flops-x 8 --seed 0 1
  $R --model resnet20-narrow --flops-x 4 2 --seed 0
) >"$OUT/worker1.log" 2>&1 &
(
  $R --model vgg-narrow --flops-x 8 --seed 0 1
  $R --model vgg-narrow --flops-x 4 2 --seed 0
  $R --model resnet20-narrow --flops-x 4 2 --seed 0 --reverse
  $R --model resnet20-narrow --flops-x 8 --seed 0 1 --reverse
) >"$OUT/worker2.log" 2>&1 &
wait
