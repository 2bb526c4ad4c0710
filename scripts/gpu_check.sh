#!/usr/bin/env bash
# The GPU checks of issue 18, as one script for a GPU machine that has Python with CUDA PyTorch but no
# network: install unison from this tree with the wheels carried in wheelhouse/, run the GPU tests and
# the GPU benchmark, and leave the logs and results in $OUT. About 8 minutes at most.
#
#   Prepare here (with network), once: scripts/gpu_check.sh --wheelhouse
#   On the GPU machine (the device tool: carry ["wheelhouse"], timeout_s 600): bash scripts/gpu_check.sh
#
# It exits non-zero if any step failed; $OUT/summary.txt says which. $OUT defaults to ./gpu-check-out.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# What unison needs beyond what such a machine has (numpy, pandas, tqdm, PyYAML, packaging, MarkupSafe,
# typing-extensions, pytest, pytest-timeout are there): the versions tested here, for Python 3.12.
WHEELS=(optuna==5.0.0 cmaes==0.13.1 colorlog==6.12.0 alembic==1.20.1 sqlalchemy==2.1.9 Mako==1.4.3
        cloudpickle==3.1.3 msgpack==1.2.4 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
        typing_extensions==4.16.0 setuptools==84.2.1)

if [[ ${1:-} == --wheelhouse ]]; then
    rm -rf wheelhouse && mkdir wheelhouse
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d wheelhouse "${WHEELS[@]}"
fi

OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=()
step() {  # step NAME SECONDS LOG COMMAND...: run COMMAND with a time limit, its output into $OUT/LOG
    local name=$1 limit=$2 log=$3
    shift 3
    echo "== $name ($(date +%T), at most ${limit} s)"
    if timeout "$limit" "$@" > >(tee "$OUT/$log") 2>&1; then
        echo "$name: ok" >> "$OUT/summary.txt"
    else
        echo "$name: FAILED (exit $?, see $log)" >> "$OUT/summary.txt"
        failed+=("$name")
    fi
}

: > "$OUT/summary.txt"
{
    nvidia-smi -L || echo "no nvidia-smi"
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available(), 'devices', torch.cuda.device_count(),
[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
    echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>} nproc=$(nproc)"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

if [[ ! -d wheelhouse ]]; then
    echo "install: FAILED (no wheelhouse/: run scripts/gpu_check.sh --wheelhouse here first, and carry it)" \
        >> "$OUT/summary.txt"
    cat "$OUT/summary.txt"
    exit 1
fi
step install 150 install.log "$PY" -m pip install --no-index --find-links wheelhouse/ -e .
if [[ ${#failed[@]} -eq 0 ]]; then
    step gpu-tests 300 gpu-tests.log "$PY" -m pytest -m gpu -v -rs -p no:cacheprovider \
        tests/test_gpu.py tests/test_gpus.py
    step gpu-benchmark 240 benchmark.log "$PY" benchmarks/ddp_overhead.py --gpu --out "$OUT/ddp_overhead-gpu.json"
fi
echo "== summary"
cat "$OUT/summary.txt"
[[ ${#failed[@]} -eq 0 ]]
