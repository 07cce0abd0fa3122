#!/usr/bin/env bash
# A plain Debian/Python base image built from Debian's packages (no image registry needed), named by its inputs:
#   tests/container/base-image.sh            # prints the tag, e.g. convnets-base:bookworm-3f2a9c01d4e5
# The tag hashes the debootstrap command (variant, suite, packages, mirror) and debootstrap's version; an image with
# that tag already in the engine's storage is reused, so a second run costs nothing. Needs root and debootstrap.
# Env: SUITE (bookworm), MIRROR (default: the machine's first Debian apt source), DOCKER (docker).
set -euo pipefail

SUITE=${SUITE:-bookworm}
PACKAGES=python3,python3-pip,ca-certificates
DOCKER=${DOCKER:-docker}
if [[ -z ${MIRROR:-} ]]; then
  # deb822 (/etc/apt/sources.list.d/*.sources) or one-line sources: the first Debian archive this machine uses.
  MIRROR=$(grep -rhoE 'https?://[^ ]*/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | head -n 1 | tr -d ' ' || true)
  if [[ -z $MIRROR ]]; then
    echo "base-image.sh: no Debian archive in this machine's apt sources; set MIRROR=<a Debian mirror URL>" >&2
    exit 2
  fi
fi

recipe="debootstrap --variant=minbase --include=$PACKAGES $SUITE ROOT $MIRROR"
version=$(dpkg-query -W -f '${Version}' debootstrap 2>/dev/null || echo unknown)
hash=$(printf '%s\n%s\n' "$recipe" "$version" | sha256sum | cut -c1-12)
tag="convnets-base:$SUITE-$hash"

if "$DOCKER" image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag is present (same inputs): reused" >&2
  echo "$tag"
  exit 0
fi

root=$(mktemp -d "${TMPDIR:-/tmp}/convnets-base.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "building $tag: ${recipe/ROOT/$root}" >&2
started=$SECONDS
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
  || { tail -n 20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# apt's package lists and caches are not needed in an image (the Dockerfile installs with pip).
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$DOCKER" import \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' - "$tag" >/dev/null
echo "built $tag in $((SECONDS - started)) s" >&2
echo "$tag"
