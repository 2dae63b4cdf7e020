#!/usr/bin/env bash
# The device check, as one command for the GPU machine (see bench/README.md, "Device check"):
#
#   1. bench/generators_gpu_check.py: the diffusers generator at batch 1 and 8 on the GPU,
#      and through the engine with isolation = "thread" and "process";
#   1b. with a py-spy binary in .tools/ (carried), the thread-mode run at batch 1 again under
#       `py-spy record --gil`: which threads hold the interpreter lock (gil_thread1.txt);
#   2. bench/engine_cpu.py --json --rounds 3: P3 (engine CPU per judgement) on that machine's CPU, with
#      the run folders on its disk, then on /dev/shm, then on /dev/shm with the engine on one core.
#
# Run from the repository root. With the wheels of bench/device_wheels.sh in .whl/ (carried
# there), they are installed into /tmp/site first. Results go under $OUT (./device-out when
# unset): gpu.txt, generators_gpu_check.json and .log, engine_cpu.txt, engine_cpu_shm.txt,
# engine_cpu_shm_1cpu.txt (and gil_thread1.txt.gz, .log with py-spy). About 5 minutes on an H200.
# It runs every step whatever the others did, and exits non-zero when one failed or missed
# its goal: engine_cpu.py exits 1 when P3 is NOT MET (see the last lines of its .txt).
#
#   bash bench/device_check.sh                          # on the device machine
#   PYTHON=.venv/bin/python bash bench/device_check.sh  # here, to try it (CPU sizes)
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
(nvidia-smi -L || echo "no nvidia-smi") > "$OUT/gpu.txt" 2>&1
status=0
timeout 300 "$python" bench/generators_gpu_check.py 2>&1 | tee "$OUT/generators_gpu_check.log"
status=$(( status | PIPESTATUS[0] ))
if [ -x .tools/py-spy ]; then  # carried by hand (ignored): who holds the interpreter lock
  # during the thread-mode run at batch 1, sampled; OUT unset so the JSON above is kept.
  OUT= timeout 150 .tools/py-spy record --gil --threads --format raw --rate 250 \
    -o /tmp/gil_thread1.txt -- "$python" bench/generators_gpu_check.py --runs thread:1 \
    > "$OUT/gil_thread1.log" 2>&1
  status=$(( status | $? ))
  gzip -c /tmp/gil_thread1.txt > "$OUT/gil_thread1.txt.gz"  # ~30 MB raw: past what comes back
fi
timeout 120 "$python" bench/engine_cpu.py --json --rounds 3 2>&1 | tee "$OUT/engine_cpu.txt"
status=$(( status | PIPESTATUS[0] ))
if [ -d /dev/shm ]; then  # the same with the run folders in memory: the disk's share apart
  timeout 120 "$python" bench/engine_cpu.py --json --rounds 3 --dir /dev/shm 2>&1 | tee "$OUT/engine_cpu_shm.txt"
  status=$(( status | PIPESTATUS[0] ))
  # and with the engine on one core, as on the 2-vCPU box: what spreading over 15 costs
  timeout 120 "$python" bench/engine_cpu.py --json --rounds 3 --dir /dev/shm --engine-cpus 1 \
    2>&1 | tee "$OUT/engine_cpu_shm_1cpu.txt"
  status=$(( status | PIPESTATUS[0] ))
fi
exit "$status"
