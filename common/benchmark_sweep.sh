#!/usr/bin/env bash
# Sweep batch sizes and precisions for one model; one JSON per point under benchmarks/results/<device>/.
#   common/benchmark_sweep.sh ARCH [extra convnets benchmark args, e.g. --mode inference --iterations 50]
# Environment: BATCH_SIZES (default "64 128 256"), PRECISIONS (default "fp32 amp"; amp is fp16 on GPU and
# bf16 on CPU, where it is slower without bf16 units), MODES (default "train inference").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"
arch="${1:?usage: benchmark_sweep.sh ARCH [ARGS...]}"
shift
for arg in "$@"; do
  if [[ "$arg" == -h || "$arg" == --help ]]; then
    sed -n '2,5p' "${BASH_SOURCE[0]}" | cut -c3-
    echo
    exec "$root/common/launch.sh" 1 benchmark --help  # prints RECIPE_NOTE first, when the recipe sets one
  fi
done
device="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' \
  | tr ' ' '-' | tr -cd 'A-Za-z0-9_.-')"
out="$root/benchmarks/results/$device"
mkdir -p "$out"
amp_dtype=float16
[[ "$device" == cpu ]] && amp_dtype=bfloat16
for mode in ${MODES:-train inference}; do
  for precision in ${PRECISIONS:-fp32 amp}; do
    for bs in ${BATCH_SIZES:-64 128 256}; do
      flags=(--no-amp)
      [[ "$precision" == amp ]] && flags=(--amp --amp-dtype "$amp_dtype")
      file="$out/${arch}_${mode}_${precision}_bs${bs}.json"
      echo "== $arch $mode $precision batch $bs -> $file"
      "$PYTHON" -m common benchmark --arch "$arch" --mode "$mode" --batch-size "$bs" "${flags[@]}" \
        --memory-format channels_last --json "$file" "$@" >/dev/null
      "$PYTHON" -c 'import json, sys; r = json.load(open(sys.argv[1])); lat = r["latency_ms"]["p99"]
print("   %.1f img/s  p99 %.1f ms  %s" % (r["throughput_img_s"], lat, r["device"]))' "$file"
    done
  done
done
