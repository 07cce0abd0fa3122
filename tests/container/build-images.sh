#!/usr/bin/env bash
# The images the container tests run, built on a Debian base made from Debian's packages (base-image.sh):
#   tests/container/build-images.sh [TAG [SERVE_TAG]]     # default convnets:test and convnets-serve:test
# pip inside the build reaches this machine's package sources through tests/container/pip_mirror.py on loopback
# (hence --network=host). One build at a time (a lock): a second caller waits, then finds every layer cached.
# Env: DOCKER_HOST, PYTHON (python3), DLLOGGER_REF (empty: GitHub is not reachable from CI), RUN_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
tag=${1:-convnets:test}
serve_tag=${2:-convnets-serve:test}
PYTHON=${PYTHON:-python3}
lock=${RUN_DIR:-/run/convnets-ci}/build.lock
mkdir -p "$(dirname "$lock")"
exec 9>"$lock"
flock 9

docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0  # Debian's docker.io: the classic builder
started=$SECONDS
base=$(tests/container/base-image.sh)
echo "base $base: $((SECONDS - started)) s" >&2

args_file=$(mktemp)
"$PYTHON" tests/container/pip_mirror.py >"$args_file" &
mirror=$!
trap 'kill "$mirror" 2>/dev/null || true; rm -f "$args_file"' EXIT
until grep -q '^#ready' "$args_file"; do
  kill -0 "$mirror" 2>/dev/null || { echo "the pip mirror did not start" >&2; exit 1; }
  sleep 0.2
done
build_args=()
while read -r line; do
  [[ $line == '#ready' ]] || build_args+=(--build-arg "$line")
done <"$args_file"

for target in full serve-onnx; do
  name=$tag; [[ $target == serve-onnx ]] && name=$serve_tag
  started=$SECONDS
  docker build --network=host "${build_args[@]}" --build-arg "BASE_IMAGE=$base" --build-arg "SERVE_BASE_IMAGE=$base" \
    --build-arg "DLLOGGER_REF=${DLLOGGER_REF:-}" --target "$target" -t "$name" . >&2
  echo "$target $name: $((SECONDS - started)) s, $(docker image inspect -f '{{.Size}}' "$name") bytes" >&2
done
# The images these tags named before (untagged now that a source change rebuilt them) would pile up in the
# engine's cache, run after run; the layers the new images still use stay.
docker image prune -f >&2
echo "$base"
