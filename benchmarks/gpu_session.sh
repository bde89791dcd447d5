#!/usr/bin/env bash
# What a session with a lent GPU runs, one stage per device call (each well inside the 10-minute call limit).
# Results land in $OUT (the device tool brings that folder back); commit them under benchmarks/results/ with the
# machine's name. The device image has torch, triton, pytest and transformers, but nothing can be installed there
# from a registry: the package itself is installed from the checkout without dependencies.
#
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
stage=${1:?stage: tests | resources | attention | contrastive | decode | train | dropin}
label=${2:-$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower())")}
out=${OUT:-benchmarks/results/_scratch}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv >"$out/gpu-$stage.txt"
case "$stage" in
  tests)
    python3 -m pytest -m gpu tests -q -rA 2>&1 | tee "$out/gpu-tests.log" ;;
  resources)
    python3 -m benchmarks.kernel_resources --out "$out/kernel-resources.md" &&
      python3 -m benchmarks.kernel_resources --op contrastive --out "$out/contrastive-resources.md" ;;
  attention)
    # One shape set per call (FlexAttention compiles per shape and mode): lfvila, video-swin-k400, long-form,
    # window-sweep, or "all" when there is time. CSV, markdown and plots (if matplotlib is there) land in $out.
    python3 -m benchmarks.run --suite attention --shapes "${3:-lfvila}" --label "$label" --out-dir "$out" "${@:4}" ;;
  contrastive)
    python3 -m benchmarks.bench_contrastive --label "$label" \
      --out "$out/contrastive-$label.csv" --markdown "$out/contrastive-$label.md" ;;
  decode)
    python3 -m benchmarks.bench_decode --label "$label" --size 360x640 \
      --out "$out/decode-$label.csv" --markdown "$out/decode-$label.md" ;;
  train)
    # The configuration: lfvila-base-model, batch 16, 32 frames at 192x320, bf16 autocast, fp32 parameters,
    # both impls (our kernels, then the torch paths), one model each. A few warm-up steps (the first compiles the
    # Triton kernels) and ~15 timed steps per impl (do_bench adds 6 calls of its own) plus one for peak memory
    # suffice: expected to take a few minutes in all (not yet timed on the device), inside the 10-minute limit of one
    # device call; keep --reps modest if a step turns out slow.
    python3 -m benchmarks.bench_train_step --label "$label" --warmup 3 --reps 15 "${@:3}" \
      --out "$out/train-step-$label.csv" --markdown "$out/train-step-$label.md" ;;
  dropin)
    # timm swin_base_patch4_window12_384 and transformers Swin-B 384 (bf16, batch 32) patched vs unpatched, and the
    # CLIP loss at N = 32768 vs open_clip's (open_clip_torch must be carried as a wheel; without it that row fails).
    python3 -m benchmarks.run --suite dropin --label "$label" --out-dir "$out" "${@:3}" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
