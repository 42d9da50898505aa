#!/usr/bin/env bash
# The GPU session of README "On a GPU", as the device commands ran it (one H200, its own Python, no network;
# run benchmarks/gpu_prepare.sh here first and carry .gpu_carry):
#   bash benchmarks/gpu_session.sh check         # benchmarks/gpu_check.py            (~5 min)
#   bash benchmarks/gpu_session.sh convergence   # gpu_convergence.py: SiT-S/2 runs, then the demo-size
#                                                # --proj-head study, 2 seeds        (~8 min)
#   bash benchmarks/gpu_session.sh demo          # the demo-protocol studies of benchmarks/convergence.py
#                                                # (rivals, ablation, scale, pairs) at once   (~9 min)
# Results go to $OUT (or benchmarks/results/gpu); FIDs are computed afterwards on the CPU (--fid-from).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_carry/whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
case "${1:-}" in
  check)
    python3 benchmarks/gpu_check.py --out "$OUT" --budget-s "${BUDGET:-240}" --inception-weights random ;;
  convergence)
    python3 benchmarks/gpu_convergence.py --out "$OUT/s2" --budget-s "${BUDGET_S2:-240}"
    # The demo's SiT and settings (benchmarks/convergence.py --study heads), 6 configs x 2 seeds at once.
    demo="--reg repulsor --bank-size 1024 --proj-hidden 512"
    runs=()
    for seed in 0 1; do
      runs+=("none-s$seed=--reg none --seed $seed"
             "repulsor-mlp-s$seed=$demo --proj-head mlp --seed $seed"
             "repulsor-s$seed=$demo --seed $seed"
             "repulsor-standardised-s$seed=$demo --proj-head standardised --seed $seed"
             "repulsor-running-s$seed=$demo --proj-head running --seed $seed"
             "repulsor-mlp-bw32-s$seed=$demo --proj-head mlp --repulsor-batch-weight 32 --seed $seed")
    done
    python3 benchmarks/gpu_convergence.py --out "$OUT/heads" --budget-s "${BUDGET_HEADS:-170}" \
      --model-flags "--model custom --depth 6 --hidden-size 128 --num-heads 4 --patch-size 4" \
      --batch 32 --lr 1e-3 --steps 1600 --ckpt-every 400 --log-every 50 --precision no --no-compile \
      --num-workers 0 --samples 250 --sample-batch 250 --runs "${runs[@]}" ;;
  demo)
    # Every run of these convergence.py studies, exactly as it would run on the CPU (--gpu-runs prints
    # them; a run shared by two studies, e.g. none-s0, runs once, at the longest step budget), all at once.
    declare -A seen=()
    runs=()
    for study in "rivals --steps 2000 --eval-every 1000" "ablation --seeds 0 --eval-every 1000" \
                 "scale --eval-every 1000" "pairs --eval-every 1000"; do
      while IFS= read -r spec; do
        name="${spec%%=*}"
        [[ -n "${seen[$name]:-}" ]] && continue
        seen[$name]=1
        runs+=("$spec")
      done < <(python3 benchmarks/convergence.py --study $study --gpu-runs)
    done
    python3 benchmarks/gpu_convergence.py --out "$OUT/demo" --budget-s "${BUDGET_DEMO:-520}" --reserve-s 75 \
      --model-flags "--model custom --depth 6 --hidden-size 128 --num-heads 4 --patch-size 4" \
      --batch 32 --lr 1e-3 --steps 2000 --precision no --no-compile --num-workers 0 --samples 250 \
      --sample-batch 250 --sample-at 1000 2000 --runs "${runs[@]}" ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh check|convergence|demo" >&2; exit 2 ;;
esac
