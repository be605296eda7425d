#!/usr/bin/env bash
# One lease of a GPU machine, prepared: the accelerator rows (accelerator.sh) inside a time
# budget, a device-time summary of the first row's profile (trace_summary.py), and the
# golden tests (the pseudo-row `golden`). Everything it keeps goes to $RESULTS, in four
# files (a lease brings back at most 8): rows.jsonl (one JSON line per row, as
# accelerator.sh prints it), logs.tgz (logs, each row's full JSON, trace summary with each
# kernel's HLO computation, the profiled step's HLO text, the golden log,
# loss_variants.json), profile.tgz and xplane.tgz (the first row's jax.profiler trace,
# Perfetto and XProf forms).
#
#   RESULTS=/tmp/r BUDGET_S=540 bash benchmarks/device_session.sh
#
# BUDGET_S: seconds for the whole script (rows are stopped at the budget, the rest skipped);
# ROWS: accelerator.sh's rows and the pseudo-rows `golden` and `loss_variants`
#   (benchmarks/loss_variants.py: the forms of the training loss's up-sampled CE, the
#   Pallas kernels' among them, ~1 min), in order (default b_train b_train_cudnn
#   b_train_cudnn_pallas_ce loss_variants golden torch_b_train torch_t_infer t_infer_cudnn
#   t_infer b_train_xla_default m2f_t_train; the torch_ rows time the PyTorch reference on
#   the same chip, ~40 s together);
# GOLDEN_DIR: a copy of ../shared/golden (the tests' SEMASK_GOLDEN_DIR, with train/ and
#   mask2former/) that travelled, else `golden` is skipped; GOLDEN_TESTS: the test files
#   (default tests/test_golden.py tests/test_golden_train.py, the cuDNN attention check
#   in tests/test_model.py and the Triton CE check in tests/test_pallas_ce.py);
#   GOLDEN_MAX_S (default 240).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
RESULTS=${RESULTS:?set RESULTS to the folder that comes back}
ROWS=${ROWS:-b_train b_train_cudnn b_train_cudnn_pallas_ce loss_variants golden torch_b_train torch_t_infer t_infer_cudnn t_infer b_train_xla_default m2f_t_train}
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
work=$(mktemp -d /tmp/semask_session_XXXX)
# The scripts under benchmarks/ import the project: on a bare device it is not installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }

golden() {  # limit in s
  if [ -z "${GOLDEN_DIR:-}" ]; then echo "# skipped golden: no GOLDEN_DIR" >&2; return; fi
  # JAX_PLATFORMS and XLA_FLAGS set (empty) so that tests/conftest.py keeps the accelerator.
  # -x: the first failure's traceback is printed at once, before a timeout can cut the
  # session's summary.
  JAX_PLATFORMS= XLA_FLAGS= SEMASK_GOLDEN_DIR=$GOLDEN_DIR \
    SEMASK_TRAIN_GOLDEN_DIR=$GOLDEN_DIR/train SEMASK_M2F_GOLDEN_DIR=$GOLDEN_DIR/mask2former \
    timeout "$1" $PY -m pytest -v -x --tb=short -p no:cacheprovider \
    --durations=0 ${GOLDEN_TESTS:-tests/test_golden.py tests/test_golden_train.py tests/test_model.py::test_cudnn_window_attention_matches_einsum_on_gpu tests/test_pallas_ce.py::test_triton_kernels_match_the_xla_form_on_gpu} 2>&1 \
    | tee "$work/golden.log" | tail -60
}

first=1
for r in $ROWS; do
  t=$(( $(left) - 30 ))
  if [ "$t" -lt 60 ]; then echo "# skipped $r: ${t}s left" >&2; continue; fi
  echo "# $r (limit ${t}s) at +$(( $(date +%s) - start ))s" >&2
  if [ "$r" = golden ]; then
    golden $(( t < ${GOLDEN_MAX_S:-240} ? t : ${GOLDEN_MAX_S:-240} ))
    continue
  fi
  if [ "$r" = loss_variants ]; then
    timeout "$t" $PY benchmarks/loss_variants.py --json "$work/loss_variants.json" 2>&1 \
      | tee "$work/loss_variants.log" | grep '^{'
    continue
  fi
  PROFILE=$first ROWS=$r OUT=$work timeout "$t" bash benchmarks/accelerator.sh \
    | tee -a "$RESULTS/rows.jsonl"
  if [ "$first" = 1 ] && [ -d "$work/profile_$r" ]; then
    $PY benchmarks/trace_summary.py "$work/profile_$r" --top 40 --hlo_dir "$work/hlo_$r" \
      --json "$work/trace_summary_$r.json" | tee "$work/trace_summary_$r.md"
    # The Perfetto/Chrome trace and the XProf xplane apart: each file must stay under the
    # size that comes back.
    (cd "$work" && find "profile_$r" -name '*.trace.json.gz' | tar czf "$RESULTS/profile.tgz" -T -
     find "profile_$r" -name '*.xplane.pb' | tar czf "$RESULTS/xplane.tgz" -T -)
  fi
  first=0
done

# The raw compile log can be tens of MB: its summary (.md, .summary.json) travels instead.
tar czf "$RESULTS/logs.tgz" -C "$work" --exclude 'profile_*' --exclude '*_compile_log.log' .
echo "# done at +$(( $(date +%s) - start ))s" >&2
