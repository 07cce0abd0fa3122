#!/usr/bin/env bash
# Issue 20's whole GPU session in one call; benchmarks/GPU_SESSION.md gives the calls and what each carries.
#   OUT=DIR [DRY=1] bash benchmarks/gpu_session.sh [--steps a,b,...|dali] [benchmarks/gpu_session.py options]
# DRY=1: the same steps on the CPU at tiny sizes (tests/test_gpu_session.py runs it). On the GPU machine, DALI
# parts carried in .whl/dali-K/ (python -m benchmarks.dali_bundle build) are kept in /tmp/dali-parts, and once
# every part is there DALI is unpacked to /tmp/site and put on PYTHONPATH.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common/python.sh"
cd "$root"
: "${OUT:?set OUT to the folder that comes back}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
log="$OUT/session.log"
if [[ "${DRY:-0}" != 1 ]] && compgen -G ".whl/dali-*/part" >/dev/null; then
  "$PYTHON" -m benchmarks.dali_bundle stash 2>&1 | tee -a "$log"
  # exit 3: parts still to come (a later call carries them); this call goes on without DALI
  "$PYTHON" -m benchmarks.dali_bundle assemble 2>&1 | tee -a "$log"
fi
if [[ -d /tmp/site/nvidia/dali ]]; then
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
  echo "gpu_session.sh: DALI from /tmp/site" | tee -a "$log"
fi
exec "$PYTHON" -m benchmarks.gpu_session "$@"
