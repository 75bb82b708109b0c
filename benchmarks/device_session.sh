#!/bin/bash
# The prepared device session (issue 12), for a session lent one GPU: two `run` calls,
# back to back while the machine is warm, from the repository root, with OUT set to the
# folder that comes back (the device tool sets it). Every step has its own time limit, so
# one that hangs cannot eat the others' time. Results: $OUT/*.json, logs: $OUT/*.log.
#
#   run: bash benchmarks/device_session.sh 1     (timeout_s 330: checks + training step)
#   run: bash benchmarks/device_session.sh 2     (timeout_s 450: compiled decode)
# The two fit a session's 15 device minutes only with the machine's start (a minute or
# more) counted: 330 + 450 s of commands leave about 2 minutes for it and no rerun.
#
# Part 1. device_checks.py: host tables == device tables on the GPU (logits, gradients, five
#         steps), no table bytes or row-optimizer state on the GPU, generation ids (host vs
#         device, compiled vs eager); then `jtok bench` (the training step, bf16 autocast as
#         the trainer) with device and host tables.
# Part 2. `jtok bench decode` with every model compiled, baseline and JTok-M, device and
#         host tables, batch 1 and 16: the GPU target is JTok-M <= 1.03x with host
#         tables. (Compiling is most of this part's time: four models, two batch sizes.)
#
# A dry run on a CPU (checks the script, not the GPU):
#   DEVICE=cpu PRESET=tiny SEQ_LEN=64 REPS=1 OUT=/tmp/dry bash benchmarks/device_session.sh 1
set -u -o pipefail
PART=${1:?usage: device_session.sh 1|2}
if [ "$PART" != 1 ] && [ "$PART" != 2 ]; then  # before anything is written
    echo "device_session.sh: part must be 1 or 2, got $PART" >&2
    exit 2
fi
OUT=${OUT:-/tmp/jtok-device-session}  # the device tool sets OUT; copy results you keep
DEVICE=${DEVICE:-cuda} PRESET=${PRESET:-small} SEQ_LEN=${SEQ_LEN:-256} REPS=${REPS:-5}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and
                                torch.cuda.get_device_name())" 2>&1 | tee "$OUT/env.log"
if [ "$PART" = 1 ]; then
    timeout 150 python3 benchmarks/device_checks.py --device "$DEVICE" \
        --out "$OUT/device_checks.json" > "$OUT/device_checks.log" 2>&1
    echo "device_checks: exit $?"
    timeout 150 python3 -m jtok bench --preset "$PRESET" --device "$DEVICE" \
        --seq-len "$SEQ_LEN" --reps $((2 * REPS + 1)) --steps 5 --placements device,host \
        --json --out "$OUT/train_gpu.json" > "$OUT/train_gpu.log" 2>&1
    echo "bench train: exit $?"
else
    timeout 430 python3 -m jtok bench decode --preset "$PRESET" --device "$DEVICE" --compile \
        --variants baseline,jtokm --reps "$REPS" --json --out "$OUT/decode_gpu.json" \
        > "$OUT/decode_gpu.log" 2>&1
    echo "bench decode: exit $?"
fi
tail -n 3 "$OUT"/*.log
