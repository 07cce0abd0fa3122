#!/usr/bin/env bash
# The benchmark suite, then the report that rebuilds benchmarks/README.md and its plots from every stored result.
#   bash benchmarks/run.sh [--quick] [python -m benchmarks.suite options, e.g. --models resnet18 --repeats 5]
# --quick: the small subset (under 10 minutes on 2 CPU cores); without it, the full suite (GPU machines, big CPUs).
# Results: benchmarks/results/<device>/suite_*.json and ratio_*.json.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common/python.sh"
cd "$root"
for arg in "$@"; do
  if [[ "$arg" == -h || "$arg" == --help ]]; then
    sed -n '2,5p' "${BASH_SOURCE[0]}" | cut -c3-
    echo
    exec "$PYTHON" -m benchmarks.suite --help
  fi
done
"$PYTHON" -m benchmarks.suite "$@"
"$PYTHON" -m benchmarks.report
