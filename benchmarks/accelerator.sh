#!/usr/bin/env bash
# The bench's accelerator rows on any GPU or TPU machine, inside a time budget: one JSON
# line per row on stdout (and in OUT/rows.jsonl), beside the official code's figures on
# the same chip (benchmarks/torch_reference.py). Run from anywhere in the repository:
#
#   bash benchmarks/accelerator.sh                                   # the default rows
#   bash benchmarks/accelerator.sh --budget 900 --rows "b_train t_infer golden" \
#       --golden ../shared/golden --out /tmp/rows --profile
#
# Options:
#   --budget S     seconds for the whole script: each row is stopped where the budget ends,
#                  and a row that would start with under 60 s left is skipped (default: none)
#   --rows "R..."  rows in order (default: b_train t_infer torch_b_train torch_t_infer)
#   --out DIR      each row's JSON, its log and the profiles (default benchmarks/out)
#   --runs N       timed steps per row (default 5)
#   --profile      a jax.profiler trace per row in OUT/profile_<row> (TensorBoard / XProf)
#   --golden DIR   the golden vectors (the tests' SEMASK_GOLDEN_DIR, with train/ and
#                  mask2former/): the row `golden` runs the golden tests on the accelerator
#   --allow_cpu    run on a CPU with tiny shapes (to check the script itself)
#
# Rows (bfloat16, 512x512, batch 16, ADE20K's 150 classes):
#   b_train            SeMask-B FPN training step, as training compiles it
#   b_train_scan       ... the Swin blocks in a lax.scan (model.block_loop=scan)
#   b_train_remat      ... rematerialised blocks (model.remat, policy full)
#   b_train_xla_default  ... with XLA:GPU's default fusions (--xla_gpu_fast_compile none)
#   b_train_fused, b_train_cudnn  ... model.attention_impl fused / cudnn
#   b_train_pallas_ce  ... loss.ce_backward=pallas (the up-sampled CE as Triton kernels)
#   b_train_cudnn_pallas_ce  both
#   b_infer, t_infer   SeMask-B / SeMask-T FPN inference
#   t_infer_fast       ... with the fast-compile XLA:GPU options (--xla_gpu_fast_compile all)
#   t_infer_fused, t_infer_cudnn  ... model.attention_impl fused / cudnn
#   m2f_t_train        SeMask-T Mask2Former training step
#   torch_b_train, torch_t_infer  the official code's operations (torch_reference.py) on
#                      the same chip with AMP bfloat16, as the official code trains;
#                      torch_b_train_fp32, torch_t_infer_fp32 in float32 (CUDA only)
#   golden             the golden tests on the accelerator, at full float32 precision
# Each bench row reports images_per_s, the step times, compile_s (cold), cached_compile_s
# (from the persistent compilation cache), peak_memory_bytes, xla_memory_bytes,
# utilization and the device (python -m semask_jax.bench --help).
#
# Needs jax for the accelerator: pip install -e '.[cuda12]' (or '.[cuda13]', '.[tpu]');
# the torch rows need torch with CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=0 ROWS="b_train t_infer torch_b_train torch_t_infer" OUT=benchmarks/out RUNS=5
PROFILE=0 GOLDEN="" ALLOW_CPU=0
while [ $# -gt 0 ]; do
  case $1 in
    --budget) BUDGET=$2; shift 2 ;;
    --rows) ROWS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --profile) PROFILE=1; shift ;;
    --golden) GOLDEN=$(cd "$2" && pwd); shift 2 ;;
    --allow_cpu) ALLOW_CPU=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "accelerator.sh: unknown option $1 (--help)" >&2; exit 2 ;;
  esac
done
KNOWN=" b_train b_train_scan b_train_remat b_train_xla_default b_train_fused b_train_cudnn
  b_train_pallas_ce b_train_cudnn_pallas_ce b_infer t_infer t_infer_fast t_infer_fused
  t_infer_cudnn m2f_t_train torch_b_train torch_t_infer torch_b_train_fp32 torch_t_infer_fp32
  golden "
for r in $ROWS; do
  [[ "$KNOWN" == *[[:space:]]$r[[:space:]]* ]] || {
    echo "accelerator.sh: unknown row $r (--help)" >&2; exit 2; }
done
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts import the project
mkdir -p "$OUT"
start=$(date +%s)

platform=$($PY -c 'import jax; print(jax.devices()[0].platform)') || exit 2
extra=() fpn_extra=() batch=16 size=512
if [ "$platform" = cpu ]; then
  if [ "$ALLOW_CPU" != 1 ]; then
    echo "accelerator.sh: jax sees no accelerator (platform cpu); --allow_cpu to dry-run" >&2
    exit 2
  fi
  batch=1 size=64 RUNS=2
  extra=(--matmul_n 256 --override embed_dim=16 --override "depths=(2,2,2,2)"
         --override "num_heads=(1,1,2,2)")
  fpn_extra=(--override fpn_channels=16)  # not a Mask2Former key
fi
$PY -c 'import jax; print("# devices:", jax.devices(), "jax", jax.__version__)' >&2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader >&2

limit=0  # seconds the current row may take (0: no budget)
run() {  # command...: under the row's limit
  if [ "$limit" -gt 0 ]; then timeout "$limit" "$@"; else "$@"; fi
}

emit() {  # name, what: one JSON line for the row (its result, or the failure)
  if [ -f "$OUT/$1.json" ]; then
    $PY -c 'import json, sys; r = json.load(open(sys.argv[1])); r["row"] = sys.argv[2]
print(json.dumps(r))' "$OUT/$1.json" "$1"
  else
    echo "{\"row\": \"$1\", \"error\": \"$2 failed or ran out of time, see $OUT/$1.log\"}"
    tail -5 "$OUT/$1.log" >&2
  fi
}

row() {  # name, bench args...
  local name=$1; shift
  local prof=() head=()
  [ "$PROFILE" = 1 ] && prof=(--profile "$OUT/profile_$name")
  [[ "$*" == *mask2former* ]] || head=("${fpn_extra[@]}")
  rm -f "$OUT/$name.json"
  run $PY -m semask_jax.bench "$@" --batch "$batch" --size "$size" --runs "$RUNS" --warmup 2 \
    "${extra[@]}" "${head[@]}" "${prof[@]}" --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  emit "$name" bench
}

torch_row() {  # name, torch_reference.py args... (CUDA, with AMP unless the name ends _fp32)
  local name=$1; shift
  local dev=(--device cuda) args=(--batch "$batch" --size "$size")
  [[ "$name" == *_fp32 ]] || dev+=(--amp)
  [ "$platform" = cpu ] && dev=(--device cpu) args=(--batch 1 --size 64 --variant T)
  rm -f "$OUT/$name.json"
  run $PY benchmarks/torch_reference.py "$@" "${args[@]}" "${dev[@]}" --runs "$RUNS" \
    --warmup 2 --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  emit "$name" "torch reference"
}

golden() {  # the golden tests on this accelerator (tests/conftest.py keeps it when
  # JAX_PLATFORMS and XLA_FLAGS are set, empty)
  if [ -z "$GOLDEN" ]; then echo '{"row": "golden", "error": "no --golden DIR"}'; return; fi
  JAX_PLATFORMS= XLA_FLAGS= SEMASK_GOLDEN_DIR=$GOLDEN SEMASK_TRAIN_GOLDEN_DIR=$GOLDEN/train \
    SEMASK_M2F_GOLDEN_DIR=$GOLDEN/mask2former run $PY -m pytest -q -x --tb=short \
    -p no:cacheprovider tests/test_golden.py tests/test_golden_train.py \
    tests/test_golden_mask2former.py tests/test_model.py tests/test_pallas_ce.py \
    >"$OUT/golden.log" 2>&1
  local rc=$?
  echo "{\"row\": \"golden\", \"exit_status\": $rc, \"summary\": \"$(tail -1 "$OUT/golden.log" | tr -d '"')\"}"
}

B=(--config configs/ade20k_semask_fpn.py:B --dtype bfloat16)
T=(--config configs/ade20k_semask_fpn.py:T --dtype bfloat16)
for r in $ROWS; do
  if [ "$BUDGET" -gt 0 ]; then
    limit=$(( BUDGET - ($(date +%s) - start) ))
    if [ "$limit" -lt 60 ]; then echo "# skipped $r: ${limit}s left" >&2; continue; fi
  fi
  echo "# $r at +$(( $(date +%s) - start ))s" >&2
  case $r in
    b_train) row "$r" "${B[@]}" --mode train ;;
    b_train_scan) row "$r" "${B[@]}" --mode train --override block_loop=scan ;;
    b_train_remat) row "$r" "${B[@]}" --mode train --remat full ;;
    b_train_xla_default) row "$r" "${B[@]}" --mode train --xla_gpu_fast_compile none ;;
    b_train_fused) row "$r" "${B[@]}" --mode train --override attention_impl=fused ;;
    b_train_cudnn) row "$r" "${B[@]}" --mode train --override attention_impl=cudnn ;;
    b_train_pallas_ce) row "$r" "${B[@]}" --mode train --loss_override ce_backward=pallas ;;
    b_train_cudnn_pallas_ce) row "$r" "${B[@]}" --mode train --override attention_impl=cudnn \
                               --loss_override ce_backward=pallas ;;
    b_infer) row "$r" "${B[@]}" --mode infer ;;
    t_infer) row "$r" "${T[@]}" --mode infer ;;
    t_infer_fast) row "$r" "${T[@]}" --mode infer --xla_gpu_fast_compile all ;;
    t_infer_fused) row "$r" "${T[@]}" --mode infer --override attention_impl=fused ;;
    t_infer_cudnn) row "$r" "${T[@]}" --mode infer --override attention_impl=cudnn ;;
    m2f_t_train) row "$r" --config configs/ade20k_semask_mask2former.py:T --dtype bfloat16 \
                   --mode train ;;
    torch_b_train|torch_b_train_fp32) torch_row "$r" --variant B --mode train ;;
    torch_t_infer|torch_t_infer_fp32) torch_row "$r" --variant T --mode infer ;;
    golden) golden ;;
  esac | tee -a "$OUT/rows.jsonl"
done
echo "# done at +$(( $(date +%s) - start ))s" >&2
