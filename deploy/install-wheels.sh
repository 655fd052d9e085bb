#!/bin/sh
# Installs the runtime wheels for a TARGET architecture into DIR, from any build machine.
#
#   deploy/install-wheels.sh amd64|arm64 DIR [REQUIREMENTS]
#
# Used by the Dockerfile's dependency stage (with $TARGETARCH, running on $BUILDPLATFORM) and by
# the arm64 smoke test, so the image and the test install exactly the same set.
# --only-binary plus --platform means pip never runs a target-arch build or setup.py: no
# emulation is needed, and a package without a wheel for the target fails here, loudly.
# manylinux_2_28 comes first because onnxruntime publishes aarch64 wheels only with that tag
# (glibc >= 2.28: Debian bookworm has 2.36; musl/Alpine cannot run them).
set -eu

if [ "$#" -lt 2 ] || [ "$#" -gt 3 ]; then
    echo "usage: $0 amd64|arm64 DIR [REQUIREMENTS]" >&2
    exit 2
fi
arch=$1
dir=$2
requirements=${3:-$(dirname "$0")/requirements.txt}

# Docker's TARGETARCH names (amd64, arm64); the machine names are accepted too.
case "$arch" in
    amd64 | x86_64) machine=x86_64 ;;
    arm64 | aarch64) machine=aarch64 ;;
    *)
        echo "$0: unsupported architecture '$arch' (want amd64 or arm64)" >&2
        exit 2
        ;;
esac

# PYTHON lets a caller pick the interpreter that runs pip; any Python >= 3.8 with pip will do,
# the wheels are chosen for CPython 3.11 whatever it is.
"${PYTHON:-python3}" -m pip install \
    --disable-pip-version-check \
    --only-binary=:all: \
    --platform "manylinux_2_28_${machine}" \
    --platform "manylinux2014_${machine}" \
    --python-version 3.11 \
    --implementation cp \
    --target "$dir" \
    --requirement "$requirements"
