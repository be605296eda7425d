#!/usr/bin/env bash
# The accelerator rows of the bench (PERF_NOTES.md), one JSON line each on stdout,
# for a session that has a GPU or TPU. Run from the repository root:
#
#   bash benchmarks/accelerator.sh        # rows: b_train b_train_scan t_infer b_train_fused t_infer_fused
#   ROWS="b_train b_train_remat t_infer" OUT=/tmp/out PROFILE=1 bash benchmarks/accelerator.sh
#
# Rows:
#   b_train        SeMask-B FPN, ADE20K (150 classes), bfloat16, training step, batch 16, 512x512
#                  (block_loop auto: the Swin blocks unrolled on an accelerator; on a GPU
#                  compiled without Triton softmax/LayerNorm and gemm fusions, as training
#                  does: semask_jax/sharding.py)
#   b_train_scan   b_train with block_loop=scan (lax.scan over block pairs: fewer kernels)
#   b_train_noautotune  b_train with XLA_FLAGS --xla_gpu_autotune_level=0 (GPU: no gemm
#                  autotuning; what it saves of the cold compile, what it costs the step)
#   b_train_xla_default  b_train with --xla_gpu_fast_compile none: XLA:GPU's default Triton
#                  softmax/LayerNorm and gemm fusions (the training step until 2026-11-26;
#                  b_train compiles it as training does, config.xla_gpu_fast_compile='train')
#   t_infer_fast   t_infer with --xla_gpu_fast_compile all (inference without those fusions)
#   b_train_compile_log  b_train (one timed step) with XLA's compile log on; compile_log.py
#                  summarises where the cold compile goes into $OUT/b_train_compile_log.md
#   b_train_remat  the same with remat full
#   b_train_fused  b_train with attention_impl=fused (jax.nn.dot_product_attention; JAX
#                  picks XLA's implementation: the H200's T inference had no gain from it)
#   b_train_cudnn  b_train with attention_impl=cudnn (cuDNN flash attention, windows as
#                  heads; deviceless: 28 % fewer bytes, 37 % less XLA temp memory)
#   b_train_pallas_ce  b_train with config.loss.ce_backward=pallas (the up-sampled CE's
#                  forward and backward as Triton kernels, semask_jax/pallas_ce.py;
#                  deviceless floor of the loss: 4.4 -> 0.5 ms of bytes, its arithmetic
#                  not counted)
#   b_train_cudnn_pallas_ce  both: cuDNN attention and the Pallas CE
#   t_infer        SeMask-T FPN, bfloat16 inference, batch 16, 512x512
#   b_infer        SeMask-B FPN, bfloat16 inference, batch 16, 512x512 (its compile beside
#                  b_train's: how much of the cold compile the forward alone takes)
#   m2f_t_train    SeMask-T Mask2Former, ADE20K, bfloat16 training step, batch 16, 512x512
#   t_infer_fused  t_infer with attention_impl=fused
#   t_infer_cudnn  t_infer with attention_impl=cudnn (window 7: 49 tokens; inference only,
#                  cuDNN trains with a bias only on even token counts)
#   torch_b_train  the PyTorch reference (benchmarks/torch_reference.py: the official code's
#                  operations, checked against the golden vectors) on the same chip: SeMask-B
#                  FPN training step, batch 16, 512x512, AMP bfloat16 (torch.autocast), the
#                  official code's setting; the denominator of the issue's ">= 4x" target
#   torch_t_infer  the same for SeMask-T inference, batch 16, AMP bfloat16
#   torch_b_train_fp32, torch_t_infer_fp32  the same in float32
# Each row reports utilization, compile_s (cold), cached_compile_s (from the persistent
# compilation cache, after jax.clear_caches()), peak_memory_bytes (device peak_bytes_in_use),
# xla_memory_bytes, images_per_s, the step times and the device. Full JSON files, the logs and,
# with PROFILE=1, a jax.profiler trace per row go to $OUT (default benchmarks/out).
#
# Needs jax with the accelerator's plugin (pip install -e '.[cuda12]' / '.[cuda13]' / '.[tpu]');
# refuses to run on CPU unless ALLOW_CPU=1 (then with tiny shapes, to check the script).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT=${OUT:-benchmarks/out}
ROWS=${ROWS:-b_train b_train_scan t_infer b_train_fused t_infer_fused}
RUNS=${RUNS:-5}
mkdir -p "$OUT"

platform=$($PY -c 'import jax; print(jax.devices()[0].platform)')
extra=()
fpn_extra=()
batch=16
size=512
if [ "$platform" = cpu ]; then
  if [ "${ALLOW_CPU:-0}" != 1 ]; then
    echo "accelerator.sh: jax sees no accelerator (platform cpu); set ALLOW_CPU=1 to dry-run" >&2
    exit 2
  fi
  # Dry run of the script itself: tiny model and shapes.
  batch=1; size=64; RUNS=2
  extra=(--matmul_n 256 --override embed_dim=16 --override "depths=(2,2,2,2)"
         --override "num_heads=(1,1,2,2)")
  fpn_extra=(--override fpn_channels=16)  # not a Mask2Former key
fi
$PY -c 'import jax; print("# devices:", jax.devices(), "jax", jax.__version__)' >&2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader >&2 || true

emit() {  # name, what failed: one JSON line for the row (its result, or the failure)
  if [ -f "$OUT/$1.json" ]; then
    $PY -c 'import json, sys; r = json.load(open(sys.argv[1])); r["row"] = sys.argv[2]
print(json.dumps(r))' "$OUT/$1.json" "$1"
  else
    echo "{\"row\": \"$1\", \"error\": \"$2 failed, see $OUT/$1.log\"}"
    tail -5 "$OUT/$1.log" >&2
  fi
}

row() {  # name, bench args...
  local name=$1; shift
  local prof=()
  [ "${PROFILE:-0}" = 1 ] && prof=(--profile "$OUT/profile_$name")
  local head=()
  [[ "$*" == *mask2former* ]] || head=("${fpn_extra[@]}")
  rm -f "$OUT/$name.json"
  $PY -m semask_jax.bench "$@" --batch "$batch" --size "$size" --runs "$RUNS" --warmup 2 \
    "${extra[@]}" "${head[@]}" "${prof[@]}" --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1 || true
  emit "$name" bench
}

torch_row() {  # name, torch_reference.py args... (on CUDA with --amp unless the name ends _fp32)
  local name=$1; shift
  local dev=(--device cuda)
  [[ "$name" == *_fp32 ]] || dev+=(--amp)
  local args=(--batch "$batch" --size "$size")
  if [ "$platform" = cpu ]; then dev=(--device cpu); args=(--batch 1 --size 64 --variant T); fi
  rm -f "$OUT/$name.json"
  $PY benchmarks/torch_reference.py "$@" "${args[@]}" "${dev[@]}" --runs "$RUNS" --warmup 2 \
    --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1 || true
  emit "$name" "torch reference"
}

for r in $ROWS; do
  case $r in
    b_train) row b_train --config configs/ade20k_semask_fpn.py:B --mode train --dtype bfloat16 ;;
    b_train_scan) row b_train_scan --config configs/ade20k_semask_fpn.py:B --mode train \
                    --dtype bfloat16 --override block_loop=scan ;;
    b_train_compile_log) TF_CPP_MIN_LOG_LEVEL=0 RUNS=1 \
                    TF_CPP_VMODULE=hlo_pass_pipeline=1,gpu_compiler=1,nvptx_compiler=1,cpu_compiler=1,gemm_fusion_autotuner=1,autotuner_util=1,compile_module_to_llvm_ir=1 \
                    row b_train_compile_log --config configs/ade20k_semask_fpn.py:B --mode train \
                    --dtype bfloat16
                  $PY benchmarks/compile_log.py "$OUT/b_train_compile_log.log" --top 30 \
                    --json "$OUT/b_train_compile_log.summary.json" \
                    > "$OUT/b_train_compile_log.md" 2>&1 || true
                  head -60 "$OUT/b_train_compile_log.md" >&2 ;;
    b_train_noautotune) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
                    row b_train_noautotune --config configs/ade20k_semask_fpn.py:B --mode train \
                    --dtype bfloat16 ;;
    b_train_xla_default) row b_train_xla_default --config configs/ade20k_semask_fpn.py:B \
                    --mode train --dtype bfloat16 --xla_gpu_fast_compile none ;;
    t_infer_fast) row t_infer_fast --config configs/ade20k_semask_fpn.py:T --mode infer \
                    --dtype bfloat16 --xla_gpu_fast_compile all ;;
    b_train_remat) row b_train_remat --config configs/ade20k_semask_fpn.py:B --mode train \
                     --dtype bfloat16 --remat full ;;
    b_train_fused) row b_train_fused --config configs/ade20k_semask_fpn.py:B --mode train \
                     --dtype bfloat16 --override attention_impl=fused ;;
    b_train_cudnn) row b_train_cudnn --config configs/ade20k_semask_fpn.py:B --mode train \
                     --dtype bfloat16 --override attention_impl=cudnn ;;
    b_train_pallas_ce) row b_train_pallas_ce --config configs/ade20k_semask_fpn.py:B \
                     --mode train --dtype bfloat16 --loss_override ce_backward=pallas ;;
    b_train_cudnn_pallas_ce) row b_train_cudnn_pallas_ce --config configs/ade20k_semask_fpn.py:B \
                     --mode train --dtype bfloat16 --override attention_impl=cudnn \
                     --loss_override ce_backward=pallas ;;
    t_infer_cudnn) row t_infer_cudnn --config configs/ade20k_semask_fpn.py:T --mode infer \
                     --dtype bfloat16 --override attention_impl=cudnn ;;
    m2f_t_train) row m2f_t_train --config configs/ade20k_semask_mask2former.py:T --mode train \
                   --dtype bfloat16 ;;
    t_infer) row t_infer --config configs/ade20k_semask_fpn.py:T --mode infer --dtype bfloat16 ;;
    b_infer) row b_infer --config configs/ade20k_semask_fpn.py:B --mode infer --dtype bfloat16 ;;
    t_infer_fused) row t_infer_fused --config configs/ade20k_semask_fpn.py:T --mode infer \
                     --dtype bfloat16 --override attention_impl=fused ;;
    torch_b_train|torch_b_train_fp32) torch_row "$r" --variant B --mode train ;;
    torch_t_infer|torch_t_infer_fp32) torch_row "$r" --variant T --mode infer ;;
    *) echo "unknown row $r" >&2; exit 2 ;;
  esac
done
