#!/usr/bin/env bash
# What a session with a lent GPU runs. A lent GPU comes with 15 minutes in all (the machine's start, every command,
# every idle wait), one command at most 10 minutes, and at most 8 files come back from $OUT. So: one call.
#
#   run(command="GPU_SESSION_COMMIT=<git rev-parse --short HEAD>[-dirty] bash benchmarks/gpu_session.sh all",
#       timeout_s=560)
#
# (GPU_SESSION_COMMIT: the device's copy of the checkout may have no git history; without git, that variable or a
# file .gpu-session-commit in the checkout names the commit, else the summary says "unknown".)
#
# `all` runs these stages in priority order, each under its own cap (timeout --signal=TERM --kill-after=10); a stage
# that fails or times out is recorded (exit status, duration, the last lines of its log) and the next one runs. The
# caps below plus install and summary sum to 530 s of a 540 s budget (GPU_SESSION_BUDGET) counted from the start;
# each cap shrinks to what is left of that budget, and the last three stages run only on what is left:
#    install      45 s  pip install --no-deps --no-build-isolation -e . (without it, PYTHONPATH=kernels:.)
#    tests       150 s  the gpu-marked tests of GPU_TEST_FILES (FlexAttention's two last, in their own pytest run)
#    attention   110 s  bench_attention lfvila, fwd and fwd+bwd: window-attention-triton, videoswin-eager, sdpa-dense-bias for
#                       all six layers, then flex fwd+bwd and flex fwd under a compile budget (compile_time rows)
#    train        90 s  bench_train_step: lfvila-base, B=16, 32x192x320, bf16, triton vs torch (clips/s, memory, MFU)
#    contrastive  60 s  bench_contrastive N=32768 d=512 ours/naive/inf-cl, then N=64k..256k ours/naive (largest N)
#    dropin       45 s  bench_dropin swin-timm: Swin-B 384, batch 32, bf16, patched vs unpatched
#    decode     (left)  bench_decode, only where `import nvidia.dali` and `import av` work (not on the GPU machine)
#    longform   (left)  bench_attention long-form, T = 32 ... 256, plus full attention under a FLOP budget
#    resources  (left)  benchmarks.kernel_resources: registers, spills, matrix ops of the kernels for sm_90
#    summary      30 s  python -m benchmarks.gpu_summary: summary.md and the archives
# What comes back in $OUT (7 files at most): summary.md (GPU, commit, torch/triton, date, each stage's status and
# time, every target's verdict: met / missed / not run, the stage figures, log tails of failed stages) and
# tests.tar.gz, attention.tar.gz, train.tar.gz, contrastive.tar.gz, dropin.tar.gz, extra.tar.gz (decode, long-form,
# resources, install log, stages.tsv, session.env, nvidia-smi): CSVs (benchmarks.harness.SCHEMA), logs, report.md
# per stage, plots/*.png. The summary is also printed last, so the call's output tail has it. Commit the results
# under benchmarks/results/ with the machine's name.
#
#   OUT=$(mktemp -d) bash benchmarks/gpu_session.sh all --dry-run
# runs every stage on a CPU at tiny sizes (Triton's interpreter where it runs; the gpu tests collected and skipped,
# plus two fast CPU tests), without pip install, with ${PYTHON:-python3}, under a 300 s budget, and writes the same
# files (tests/benchmarks/test_gpu_session.py runs it).
#
# Single stages, one per device call (each well inside the 10-minute call limit), into $OUT directly:
#   bash benchmarks/gpu_session.sh tests        # gpu-marked tests (correctness in bf16/fp16/fp32, determinism)
#   bash benchmarks/gpu_session.sh resources    # what the compiled kernels use on this GPU (registers, spills)
#   bash benchmarks/gpu_session.sh attention  h200-2026-11-22 long-form   # a shape set (default lfvila) or all
#   bash benchmarks/gpu_session.sh contrastive h200-2026-11-22
#   bash benchmarks/gpu_session.sh decode      h200-2026-11-22   # needs PyAV and DALI carried as wheels in .whl
#                                                                # (the device README says how; DALI in 3 parts)
#   bash benchmarks/gpu_session.sh train       h200-2026-11-22   # one LF-VILA stage-1 training step, triton vs torch
#   bash benchmarks/gpu_session.sh train       h200-adamw --optimizer   # extra arguments go to bench_train_step
#   bash benchmarks/gpu_session.sh dropin      h200-2026-11-22   # timm / transformers Swin-B and CLIP's loss
set -uo pipefail
self=$(readlink -f "${BASH_SOURCE[0]}")
root=$(dirname "$(dirname "$self")")
cd "$root" || exit 1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

# The gpu-marked tests, in priority order: the kernels at full shapes and their determinism, the patched timm /
# transformers Swin, then the rest. Named files, not `tests`: on the GPU machine (no PyAV, no DALI) collecting the
# data and training tests fails, and one collection error stops a whole pytest run.
GPU_TEST_FILES=(
  tests/kernels/test_window_attention_gpu.py tests/kernels/test_contrastive_gpu.py tests/kernels/test_patch.py
  tests/train/test_checkpoint.py tests/train/test_optim.py tests/benchmarks/test_attention_suite.py
  tests/benchmarks/test_harness.py
)
# What the dry run runs for real besides collecting (and skipping) the gpu tests: two fast CPU tests of the benchmark
# plumbing, selected by name in the same pytest run (-k matches marker names too: "gpu" selects the gpu-marked tests;
# no other test of GPU_TEST_FILES has "gpu" in its name).
DRY_CPU_TESTS="test_guarded_and_exception_chain or test_full_attention_oracle_is_exact_and_chunked"
# -v: one "nodeid OUTCOME" line per test, so a run cut short by its cap still shows what finished.
PYTEST=(-m pytest -p no:randomly -p no:cacheprovider --continue-on-collection-errors -v -rA --durations=20)

# --------------------------------------------------------------------------------------------------- stages
# Each runs as `bash gpu_session.sh _stage NAME` with GS_DIR (its folder), GS_WORK, GS_LABEL, GS_DRY (1: dry run)
# and GS_CAP (its cap in seconds) set, its stdout and stderr in $GS_DIR/NAME.log. Exit status: the first failure.
note_rc() {  # note_rc STATUS: keep the first non-zero status in $rc
  local r=$1
  if (( r != 0 && rc == 0 )); then rc=$r; fi
}

stage_install() {
  $PY -m pip install -q --no-deps --no-build-isolation -e .
}

stage_tests() {
  rc=0
  if (( GS_DRY )); then  # no GPU: the gpu tests are collected and skipped (tests/conftest.py), two CPU tests run
    $PY "${PYTEST[@]}" -k "gpu or $DRY_CPU_TESTS" "${GPU_TEST_FILES[@]}" --junitxml="$GS_DIR/junit-dry.xml"
    note_rc $?
  else  # FlexAttention compiles for tens of seconds per test: its tests last, in their own run
    $PY "${PYTEST[@]}" -m gpu -k "not flex" "${GPU_TEST_FILES[@]}" --junitxml="$GS_DIR/junit-main.xml"; note_rc $?
    $PY "${PYTEST[@]}" -m gpu -k flex "${GPU_TEST_FILES[@]}" --junitxml="$GS_DIR/junit-flex.xml"; note_rc $?
  fi
  return "$rc"
}

stage_attention() {
  rc=0
  local csv="$GS_DIR/attention-lfvila-$GS_LABEL.csv"
  local bench=($PY -m benchmarks.bench_attention --label "$GS_LABEL" --out "$csv")
  if (( GS_DRY )); then
    bench+=(--shapes tiny --frames 2 --interpret-ok --reps 1 --warmup 0)
    "${bench[@]}" --cases tiny-div --providers window-attention-triton,videoswin-eager,sdpa-dense-bias --modes fwd,fwd+bwd
    note_rc $?
    # One FlexAttention compile (tiny-div fwd), then the 1 s budget skips every later (shape, mode).
    "${bench[@]}" --providers flex --modes fwd,fwd+bwd --compile-budget 1; note_rc $?
    return "$rc"
  fi
  bench+=(--shapes lfvila)
  "${bench[@]}" --providers window-attention-triton,videoswin-eager,sdpa-dense-bias --modes fwd,fwd+bwd; note_rc $?
  # FlexAttention compiles once per (shape, mode): fwd+bwd first (the target's mode), each under a compile budget
  # from what is left of this stage's cap (a compile in flight may overrun it by its own length).
  local budget=$(( (GS_CAP - SECONDS) * 2 / 3 - 15 ))
  (( budget > 60 )) && budget=60
  if (( budget > 5 )); then
    "${bench[@]}" --providers flex --modes fwd+bwd --compile-budget "$budget"; note_rc $?
  else
    echo "flex fwd+bwd not run: ${budget} s of compile budget left in this stage"
  fi
  budget=$(( GS_CAP - SECONDS - 25 ))
  (( budget > 30 )) && budget=30
  if (( budget > 5 )); then
    "${bench[@]}" --providers flex --modes fwd --compile-budget "$budget"; note_rc $?
  else
    echo "flex fwd not run: ${budget} s of compile budget left in this stage"
  fi
  return "$rc"
}

stage_train() {
  local bench=($PY -m benchmarks.bench_train_step --label "$GS_LABEL" --out "$GS_DIR/train-$GS_LABEL.csv")
  if (( GS_DRY )); then  # the interpreter takes ~20 s per tiny training step: the triton provider is skipped
    "${bench[@]}" --batch 1 --frames 4 --size 32x48 --warmup 2 --reps 1 --no-rss
  else  # the issue's configuration (the CUDA defaults); the first warm-up step compiles the kernels
    "${bench[@]}" --warmup 2 --reps 5
  fi
}

stage_contrastive() {
  rc=0
  local bench=($PY -m benchmarks.bench_contrastive --label "$GS_LABEL" --out "$GS_DIR/contrastive-$GS_LABEL.csv")
  if (( GS_DRY )); then
    bench+=(--dim 32 --interpret-ok --no-rss --reps 1 --warmup 0)
    "${bench[@]}" --sizes 128 --providers ours,naive,inf-cl; note_rc $?
    "${bench[@]}" --sizes 256 --providers ours,naive --no-check; note_rc $?
    return "$rc"
  fi
  "${bench[@]}" --sizes 32768 --dim 512 --providers ours,naive,inf-cl; note_rc $?
  # The largest N: naive runs out of memory on the way (then skipped above); no float64 reference at these sizes.
  "${bench[@]}" --sizes 65536,131072,262144 --dim 512 --providers ours,naive --no-check; note_rc $?
  return "$rc"
}

stage_dropin() {
  local bench=($PY -m benchmarks.bench_dropin --label "$GS_LABEL" --out "$GS_DIR/dropin-$GS_LABEL.csv"
               --workloads swin-timm)
  if (( GS_DRY )); then
    "${bench[@]}" --reduced --batch 1 --reps 1 --warmup 0
  else
    "${bench[@]}" --rep-ms 1000 --warmup-ms 250
  fi
}

stage_decode() {
  local bench=($PY -m benchmarks.bench_decode --label "$GS_LABEL" --out "$GS_DIR/decode-$GS_LABEL.csv"
               --scratch "$GS_WORK/decode-inputs")
  if (( GS_DRY )); then
    "${bench[@]}" --videos 1 --seconds 2 --size 48x96 --inputs raw-vp9 --workloads uniform32 \
      --providers pyav-1proc,dali-cpu --repeats 1 --procs 1
  else
    "${bench[@]}" --size 360x640 --seconds 60 --repeats 2
  fi
}

stage_longform() {
  local bench=($PY -m benchmarks.bench_attention --shapes long-form --label "$GS_LABEL"
               --out "$GS_DIR/attention-long-form-$GS_LABEL.csv" --modes fwd,fwd+bwd)
  if (( GS_DRY )); then
    "${bench[@]}" --cases 8,16 --providers videoswin-eager,full-sdpa --full-max-flops 1e10 --reps 1 --warmup 0
  else
    "${bench[@]}" --providers window-attention-triton,videoswin-eager,sdpa-dense-bias,full-sdpa --full-max-flops 1e13
  fi
}

stage_resources() {
  rc=0
  export TRITON_INTERPRET=0  # kernel_resources compiles real kernels (ahead of time, for sm_90)
  if (( GS_DRY )); then
    $PY -m benchmarks.kernel_resources --op contrastive --layers d256 \
      --out "$GS_DIR/contrastive-resources-sm90-bf16.md"; note_rc $?
    return "$rc"
  fi
  $PY -m benchmarks.kernel_resources --out "$GS_DIR/kernel-resources-sm90-bf16.md"; note_rc $?
  $PY -m benchmarks.kernel_resources --op contrastive --out "$GS_DIR/contrastive-resources-sm90-bf16.md"; note_rc $?
  return "$rc"
}

# --------------------------------------------------------------------------------------------------- all
record() {  # record STAGE STATUS RC SECONDS CAP NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6//$'\t'/ }" >>"$work/stages.tsv"
  echo "[gpu-session] $1: $2${3:+ (exit $3)} after $4 s (cap $5 s)${6:+: $6}"
}

run_stage() {  # run_stage NAME CAP [MIN]: run within min(CAP, what is left of the budget), if that is >= MIN
  local name=$1 nominal=$2 min=${3:-15}
  local left=$(( t0 + budget - reserve - $(date +%s) - 10 ))  # 10: TERM's grace before KILL
  local cap=$(( nominal < left ? nominal : left ))
  last_status="not run"
  if (( cap < min )); then
    local why="no time left: $(( left > 0 ? left : 0 )) s of the budget remained, it needs $min s"
    (( nominal < min )) && why="its cap of $nominal s is below the $min s it needs"
    record "$name" "not run" "" 0 "$nominal" "$why"
    return
  fi
  mkdir -p "$work/$name"
  local start end rc ms
  start=$(date +%s%N)
  GS_DIR="$work/$name" GS_CAP=$cap timeout --signal=TERM --kill-after=10 "$cap" bash "$self" _stage "$name" \
    >"$work/$name/$name.log" 2>&1
  rc=$?
  end=$(date +%s%N)
  ms=$(( (end - start) / 1000000 ))
  local secs="$(( ms / 1000 )).$(( ms % 1000 / 100 ))" status=ok note=""
  if (( rc == 124 || (rc == 137 && ms >= cap * 1000) )); then
    status=timeout; note="stopped at its cap of $cap s"
  elif (( rc != 0 )); then
    status=failed
  fi
  last_status=$status
  record "$name" "$status" "$rc" "$secs" "$cap" "$note"
}

commit_of_checkout() {  # "COMMIT SOURCE": git (with -dirty), else $GPU_SESSION_COMMIT, else .gpu-session-commit
  local c
  if c=$(git rev-parse --short HEAD 2>/dev/null) && [[ -n $c ]]; then
    if [[ -n $(git status --porcelain -- . ':(exclude)benchmarks/results' ':(exclude).gpu-session-commit' \
               2>/dev/null) ]]; then
      c="$c-dirty"
    fi
    echo "$c git"
  elif [[ -n ${GPU_SESSION_COMMIT:-} ]]; then
    echo "${GPU_SESSION_COMMIT//[[:space:]]/} environment-GPU_SESSION_COMMIT"
  elif [[ -s .gpu-session-commit ]]; then
    echo "$(head -c 80 .gpu-session-commit | tr -d '[:space:]') file-.gpu-session-commit"
  else
    echo "unknown nothing"
  fi
}

run_all() {
  local dry=0 arg
  for arg in "$@"; do
    case "$arg" in
      --dry-run) dry=1 ;;
      *) echo "all: unknown argument $arg (only --dry-run)" >&2; return 2 ;;
    esac
  done
  local out=${OUT:-benchmarks/results/_scratch/gpu-session}
  mkdir -p "$out" && out=$(cd "$out" && pwd) || return 1
  t0=$(date +%s)
  budget=${GPU_SESSION_BUDGET:-$(( dry ? 300 : 540 ))}
  reserve=30  # the summary's cap, kept aside from the start
  work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-session.XXXXXX") || return 1
  unset LFVILA_KERNELS  # every stage chooses its own implementation
  if (( dry )); then
    GS_LABEL=dry-run-cpu
  else
    unset TRITON_INTERPRET
    local gpu
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    gpu=${gpu:-$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")}
    GS_LABEL=${GPU_SESSION_LABEL:-$(echo "$gpu" | tr '[:upper:] ' '[:lower:]-' | tr -cd 'a-z0-9._-')-$(date -u +%F)}
  fi
  export GS_WORK=$work GS_DRY=$dry GS_LABEL
  local commit source
  read -r commit source < <(commit_of_checkout)
  {
    echo "label=$GS_LABEL"
    echo "mode=$( (( dry )) && echo dry-run || echo full)"
    echo "commit=$commit"
    echo "commit_source=${source//-/ }"
    echo "budget_s=$budget"
    echo "started_utc=$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  } >"$work/session.env"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv \
    >"$work/nvidia-smi.txt" 2>/dev/null || rm -f "$work/nvidia-smi.txt"
  printf 'stage\tstatus\trc\tseconds\tcap_s\tnote\n' >"$work/stages.tsv"
  echo "[gpu-session] label $GS_LABEL, commit $commit, budget $budget s, work folder $work, results in $out"

  if (( dry )); then
    record install "not run" "" 0 0 "dry run: the current environment's package is used"
  else
    run_stage install 45
    if [[ $last_status != ok && -f kernels/lfvila_kernels/__init__.py ]]; then
      export PYTHONPATH="$root/kernels:$root${PYTHONPATH:+:$PYTHONPATH}"
      echo "[gpu-session] install $last_status: PYTHONPATH=$PYTHONPATH instead"
    fi
  fi
  local caps
  if (( dry )); then caps=(60 80 45 40 40 40 40 30); else caps=(150 110 90 60 45 120 120 90); fi
  run_stage tests "${caps[0]}" 30
  run_stage attention "${caps[1]}" 30
  run_stage train "${caps[2]}" 30
  run_stage contrastive "${caps[3]}" 20
  run_stage dropin "${caps[4]}" 20
  if ! timeout 60 $PY -c "import nvidia.dali" >/dev/null 2>&1; then
    record decode "not run" "" 0 "${caps[5]}" "DALI is not importable here"
  elif ! timeout 60 $PY -c "import av" >/dev/null 2>&1; then
    record decode "not run" "" 0 "${caps[5]}" "PyAV is not importable here (bench_decode encodes its inputs with it)"
  else
    run_stage decode "${caps[5]}" 30
  fi
  run_stage longform "${caps[6]}" 30
  run_stage resources "${caps[7]}" 20

  local summary_args=(--work "$work" --out "$out")
  (( dry )) && summary_args+=(--dry-run)
  timeout --signal=TERM --kill-after=5 $(( reserve - 5 )) $PY -m benchmarks.gpu_summary "${summary_args[@]}"
  local src=$?
  if (( src != 0 )) || [[ ! -s $out/summary.md ]]; then  # the data still comes back, with the stage table
    {
      echo "# GPU session $GS_LABEL: the summary builder failed (exit $src)"
      echo
      echo "commit $commit ($source); stages (stages.tsv):"
      echo
      sed 's/^/    /' "$work/stages.tsv"
    } >"$out/summary.md"
    local name
    for name in tests attention train contrastive dropin; do
      [[ -d $work/$name ]] && tar -czf "$out/$name.tar.gz" -C "$work" "$name"
    done
    tar -czf "$out/extra.tar.gz" -C "$work" --ignore-failed-read session.env stages.tsv \
      $(cd "$work" && ls -d nvidia-smi.txt install decode longform resources 2>/dev/null)
  fi
  echo "[gpu-session] done in $(( $(date +%s) - t0 )) s; $out:"
  ls -l "$out"
  echo
  cat "$out/summary.md"
  if [[ -z ${GPU_SESSION_KEEP_WORK:-} ]]; then rm -rf "$work"; fi
  return 0
}

case "${1:-}" in
  _stage) "stage_$2"; exit $? ;;
  all) shift; run_all "$@"; exit $? ;;
esac

# --------------------------------------------------------------------------------------------------- single stages
stage=${1:?stage: all [--dry-run] | tests | resources | attention | contrastive | decode | train | dropin}
label=${2:-$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower())")}
out=${OUT:-benchmarks/results/_scratch}
mkdir -p "$out"
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv >"$out/gpu-$stage.txt"
case "$stage" in
  tests)
    $PY "${PYTEST[@]}" -m gpu "${GPU_TEST_FILES[@]}" 2>&1 | tee "$out/gpu-tests.log" ;;
  resources)
    $PY -m benchmarks.kernel_resources --out "$out/kernel-resources.md" &&
      $PY -m benchmarks.kernel_resources --op contrastive --out "$out/contrastive-resources.md" ;;
  attention)
    # One shape set per call (FlexAttention compiles per shape and mode): lfvila, video-swin-k400, long-form,
    # window-sweep, or "all" when there is time. CSV, markdown and plots (if matplotlib is there) land in $out.
    $PY -m benchmarks.run --suite attention --shapes "${3:-lfvila}" --label "$label" --out-dir "$out" "${@:4}" ;;
  contrastive)
    $PY -m benchmarks.bench_contrastive --label "$label" \
      --out "$out/contrastive-$label.csv" --markdown "$out/contrastive-$label.md" ;;
  decode)
    $PY -m benchmarks.bench_decode --label "$label" --size 360x640 \
      --out "$out/decode-$label.csv" --markdown "$out/decode-$label.md" ;;
  train)
    # The issue's configuration: lfvila-base, batch 16, 32 frames at 192x320, bf16 autocast, fp32 parameters,
    # both impls (our kernels, then the torch paths), one model each. A few warm-up steps (the first compiles the
    # Triton kernels) and ~15 timed steps per impl (do_bench adds 6 calls of its own) plus one for peak memory and
    # one for the FLOP count (MFU): expected to take a few minutes in all (not yet timed on the device), inside the
    # 10-minute limit of one device call; keep --reps modest if a step turns out slow.
    $PY -m benchmarks.bench_train_step --label "$label" --warmup 3 --reps 15 "${@:3}" \
      --out "$out/train-step-$label.csv" --markdown "$out/train-step-$label.md" ;;
  dropin)
    # timm swin_base_patch4_window12_384 and transformers Swin-B 384 (bf16, batch 32) patched vs unpatched, and the
    # CLIP loss at N = 32768 vs open_clip's (open_clip_torch must be carried as a wheel; without it that row fails).
    $PY -m benchmarks.run --suite dropin --label "$label" --out-dir "$out" "${@:3}" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
