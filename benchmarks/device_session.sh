#!/bin/bash
# The prepared device session (issue 12): run it in one `run` call on a machine with one
# GPU, from the repository root, with OUT set to the folder that comes back (the device
# tool sets it). At most about 9 minutes; every step has its own time limit, so one
# that hangs cannot eat the others' time. Results: $OUT/*.json, logs: $OUT/*.log.
#
#   run: bash benchmarks/device_session.sh       (timeout_s 580)
#
# 1. device_checks.py: host tables == device tables on the GPU (logits, gradients, five
#    steps), no table bytes or row-optimizer state on the GPU, generation ids (host vs
#    device, compiled vs eager).
# 2. `jtok bench decode` on the GPU, every variant compiled, device and host tables,
#    batch 1 and 16 (the GPU target: JTok-M <= 1.03x with host tables).
# 3. `jtok bench` (the training step) on the GPU, device and host tables.
# A dry run on a CPU (checks the script, not the GPU):
#   DEVICE=cpu PRESET=tiny SEQ_LEN=64 REPS=1 OUT=/tmp/dry bash benchmarks/device_session.sh
set -u -o pipefail
OUT=${OUT:-benchmarks/results/device}
DEVICE=${DEVICE:-cuda} PRESET=${PRESET:-small} SEQ_LEN=${SEQ_LEN:-256} REPS=${REPS:-5}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and
                                torch.cuda.get_device_name())" 2>&1 | tee "$OUT/env.log"
timeout 120 python3 benchmarks/device_checks.py --device "$DEVICE" \
    --out "$OUT/device_checks.json" > "$OUT/device_checks.log" 2>&1
echo "device_checks: exit $?"
timeout 270 python3 -m jtok bench decode --preset "$PRESET" --device "$DEVICE" --compile \
    --reps "$REPS" --json --out "$OUT/decode_gpu.json" > "$OUT/decode_gpu.log" 2>&1
echo "bench decode: exit $?"
timeout 130 python3 -m jtok bench --preset "$PRESET" --device "$DEVICE" --seq-len "$SEQ_LEN" \
    --reps $((2 * REPS + 1)) --steps 5 --placements device,host --json \
    --out "$OUT/train_gpu.json" > "$OUT/train_gpu.log" 2>&1
echo "bench train: exit $?"
tail -n 3 "$OUT"/*.log
