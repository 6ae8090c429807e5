#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run (a few minutes), from the repository root:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]      (STEPS="tests" runs only step 1)
#
# 1. the tests marked `gpu` (async saves of CUDA state through pinned buffers, the NVML probe on
#    this machine's GPUs, kill -9 and resume of the example on CUDA) and tests/test_probes.py,
#    which skip or take other paths without a GPU;
# 2. bench_checkpoint.py --device cuda: sync save and save_async stall of a 1 GiB state of 340
#    CUDA tensors (the stall is the device->host copy into pinned buffers);
# 3. bench_daemon.py: the tick with the live NVML against one `nvidia-smi --query-gpu` run, and
#    the real daemon against a naive poller of the real nvidia-smi.
#
# It reads the GPU's settings (persistence mode, clocks) and changes none of them. Wheels of
# missing dependencies in ./.whl (a machine with no package index) are installed under /tmp/site.
# Each step's output is also written to OUT_DIR (default: a new temporary directory). Exit
# status: 0 when every step passed, else 1.
set -u
steps=${STEPS:-tests checkpoint daemon}
failed=0
out=${1:-${OUT:-$(mktemp -d)}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
fi
step() {  # step NAME TIMEOUT_S COMMAND...: run, keep its output, say how it ended
    local name=$1 limit=$2
    shift 2
    case " $steps " in *" $name "*) ;; *) return ;; esac
    echo "=== $name ($(date +%T), load $(cut -d' ' -f1 /proc/loadavg))"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "=== $name: exit $rc"
    [ "$rc" -eq 0 ] || failed=1
}
nvidia-smi --query-gpu=name,driver_version,persistence_mode,memory.total,clocks.sm \
    --format=csv
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__,
torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPU(s)')"
nproc
df -h . | tail -n 1
step tests 240 python3 -m pytest -q -p no:cacheprovider -n 4 -m "gpu or not gpu" \
    tests/test_cuda.py tests/test_probes.py "tests/test_trainer_e2e.py::TestKillAndResume"
step checkpoint 240 python3 benchmarks/bench_checkpoint.py --device cuda --figures save,stall \
    --repeat 3
step daemon 300 python3 benchmarks/bench_daemon.py --watch-s 60 --ticks 400 --repeat 1
exit "$failed"
