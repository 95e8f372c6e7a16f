#!/usr/bin/env bash
# One GPU session in one go: environment facts, the cuda-marked tests (rewriting tests/GPU_RESULTS.md), then the
# benchmark. Every log lands in LOGDIR so a single invocation on a GPU machine brings everything back.
#
#   tests/gpu_session.sh LOGDIR [WHEEL_DIR] [-- extra bench args]
#
# WHEEL_DIR (optional) holds wheels for packages the GPU machine lacks and cannot download (nvtx, cupti-python,
# diffusers); they are installed offline into a private site directory first. STAGES (env) selects what runs:
# any of "env tests coldstart bench" (default: "env tests bench"; coldstart adds ~1.5 min at 1536 tokens: fresh
# caches once, then warm caches twice, the first run filling them, then twice more with Python bytecode kept).
set -uo pipefail
logdir=${1:?usage: tests/gpu_session.sh LOGDIR [WHEEL_DIR] [-- bench args]}
shift
wheels=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then wheels=$1; shift; fi
[ "${1:-}" = "--" ] && shift
stages=${STAGES:-"env tests bench"}
mkdir -p "$logdir"
export PYTHONUNBUFFERED=1
python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)" \
  || { echo "tests/gpu_session.sh: no CUDA GPU is visible to python3's torch: nothing to run"; exit 2; }

if [ -n "$wheels" ]; then
  site=/tmp/ltx2-site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
    || { echo "offline wheel install from $wheels failed"; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# Editable install without network: registers the console script and the pytest plugin's entry point.
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$logdir/install.log" 2>&1 \
  || { cat "$logdir/install.log"; echo "editable install failed"; exit 1; }

if [[ " $stages " == *" env "* ]]; then
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
    python3 -c "import nvtx, diffusers; print('nvtx ok, diffusers', diffusers.__version__)"
    python3 -c "from cupti import cupti; print('cupti ok')"
  } 2>&1 | tee "$logdir/env.log"
fi

status=0
if [[ " $stages " == *" tests "* ]]; then
  python3 tests/run_gpu.py 2>&1 | tee "$logdir/gpu_tests.log"
  status=${PIPESTATUS[0]}
  cp tests/GPU_RESULTS.md "$logdir/" 2>/dev/null
fi

if [[ " $stages " == *" coldstart "* ]]; then
  {
    ltx2-graphs coldstart --tokens 1536 --quiet --json "$logdir/coldstart_fresh.json"
    ltx2-graphs coldstart --tokens 1536 --cache warm --quiet >/dev/null
    ltx2-graphs coldstart --tokens 1536 --cache warm --quiet --json "$logdir/coldstart_warm.json"
    # As an installation with bytecode starts (machines that forbid writing it compile torch's modules from source
    # in every process): the first run writes the bytecode, the second reads it.
    pycache=$(mktemp -d)
    env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX="$pycache" \
      ltx2-graphs coldstart --tokens 1536 --cache warm --quiet >/dev/null
    env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX="$pycache" \
      ltx2-graphs coldstart --tokens 1536 --cache warm --quiet --json "$logdir/coldstart_warm_bytecode.json"
    rm -rf "$pycache"
  } 2>&1 | tee "$logdir/coldstart.log"
fi

if [[ " $stages " == *" bench "* ]]; then
  ltx2-graphs bench --json "$logdir/bench.json" "$@" 2>&1 | tee "$logdir/bench.log"
fi
exit "$status"
