#!/usr/bin/env bash
# Everything the zoo does on a GPU, in one command, within ~8 minutes on one GPU:
#
#     benchmarks/gpu_check.sh <output folder>
#
# - the kernel tests (tests/test_kernels.py: the Triton kernels compiled on CUDA, the C++ ones
#   on CPU, each against its pure-PyTorch reference);
# - benchmarks/kernels.py --device cuda (each op against its reference, torch.compile and SDPA);
# - the detection training step (GroupSoftmax Faster R-CNN against stock torchvision, batch 2,
#   800-px short side, ResNet-50-FPN and MobileNetV3-FPN) with bf16 autocast off and on;
# - pix2pix and SparseBERT training steps on CUDA.
#
# Each part writes its output to <folder>/<part>.txt; <folder>/summary.txt lists each part's
# exit status and seconds. A part that fails or runs past its limit does not stop the others.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh <output folder>}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; } \
  > "$OUT/device.txt" 2>&1

part() {  # part <name> <limit seconds> <command...>
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 15 "$OUT/$name.txt"
}

part kernel_tests 120 $PY -m pytest -q -n 0 -p no:cacheprovider tests/test_kernels.py
part kernels 120 $PY benchmarks/kernels.py --device cuda
part detection_step 150 $PY benchmarks/data_scale.py --only step --device cuda --amp both --steps 10
part pix2pix_step 60 $PY benchmarks/pix2pix_step.py --device cuda --steps 10
part sparsebert_step 60 $PY benchmarks/sparsebert_step.py --device cuda --reps 10
echo "figures in $OUT"
