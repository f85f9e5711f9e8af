#!/usr/bin/env bash
# The CUDA checks in one run, on a machine with an NVIDIA GPU and PyTorch (e.g. a lent H200):
# the CUDA tests (tests/test_gpu.py), the per-device benchmark with the mock lower bound, and the
# ablation of the optimizations on CUDA; a short table at the end. Results go to $OUT (default outputs/gpu).
#
#   make gpu-wheels          # here, once: the packages a bare GPU image lacks (effdet, omegaconf,
#                            # pycocotools...) as wheels in .whl/ (git-ignored), carried along
#   scripts/gpu_check.sh     # there, from the repository root
#
# QUICK=1 shortens every step (a smoke run).
set -uo pipefail
OUT=${OUT:-outputs/gpu}
PY=${PYTHON:-python3}
REQ=${REQUESTS:-40}
[ "${QUICK:-0}" = 1 ] && REQ=6
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PY' || exit 1
import torch, effdet
assert torch.cuda.is_available(), "no CUDA device visible to PyTorch"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, effdet {effdet.__version__}")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" scripts/generate_checkpoints.py >/dev/null || exit 1  # seeded random weights of models.yaml's set
VAL=${VAL_IMAGES:-50}  # labelled val images per model for the ablation's mAP (data/ is not carried)
"$PY" scripts/recipe.py dataset --splits val --val-count "$VAL" >/dev/null || exit 1

status=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" || status=1
"$PY" scripts/run_full_benchmark.py --mock --devices cuda,cpu --requests "$REQ" --out "$OUT" || status=1
# every optimization the registry says runs on CUDA (list_optimizations(device="cuda", servable=True, distinct=True))
"$PY" scripts/run_ablation.py --device cuda --requests "$REQ" --out "$OUT" --val-images "$VAL" || status=1

echo
echo "== CUDA ablation ($OUT/ablation_report.txt) =="
cat "$OUT/ablation_report.txt" 2>/dev/null
echo "== devices ($OUT/benchmark_report.txt) =="
sed -n '4,12p' "$OUT/benchmark_report.txt" 2>/dev/null
grep -E "passed|failed" "$OUT/gpu_tests.log" | tail -1
exit $status
