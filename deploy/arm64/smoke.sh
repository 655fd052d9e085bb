#!/usr/bin/env bash
# arm64 smoke test (`make arm64-smoke`): runs the real server as an aarch64 process under
# qemu-user and checks that it answers like the x86 build, from the host, over loopback.
#
# Why it is built this way (see shared/DESIGN.md, "ARM64 under emulation"):
#  - CI has no ARM hardware, no binfmt_misc (and we must not register it), and no working
#    docker/podman run. So one aarch64 process is started explicitly as
#      chroot ROOT /usr/bin/qemu-aarch64-static /usr/bin/python3.11 -m service
#    Nothing inside can exec another aarch64 binary: everything is prepared from the host and
#    the environment is passed from the host side. (`qemu -L ROOT` without chroot lets
#    onnxruntime read the host's /proc/cpuinfo and crash.)
#  - The root is Debian bookworm's arm64 packages fetched with `debootstrap --download-only`
#    (its default mirror) and unpacked with `dpkg-deb -x`: no second stage, so no maintainer
#    script ever runs; Python only needs the files.
#  - The Python packages come from deploy/install-wheels.sh and deploy/requirements.txt, the
#    same script and pins the Dockerfile uses, so this tests what the arm64 image ships.
#
# Needs: root; apt packages qemu-user-static debootstrap debian-archive-keyring; the repo's
# .venv (make creates it); ../shared (or MNV3_SHARED) for the real weights and photo.
# Caches under build/: the root is rebuilt only when its stamp is missing or out of date.
# Prints PROOF lines (checked by tests/test_arm64.py) and TIMING lines; exit 0 = all passed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SHARED=$(cd "${MNV3_SHARED:-$REPO/../shared}" && pwd)
# Not $PYTHON: make passes its own PYTHON (a bare python3 without our packages) to recipes.
HOST_PY=${MNV3_HOST_PYTHON:-$REPO/.venv/bin/python}
BUILD=$REPO/build
ROOT=$BUILD/arm64-root
WORK=$BUILD/arm64-smoke
QEMU=/usr/bin/qemu-aarch64-static

SUITE=bookworm
# python3.11 and its stdlib (json, asyncio, ssl, ctypes, ...); the C/C++ runtime that the
# manylinux wheels of onnxruntime, numpy, pillow and grpcio link against. debootstrap resolves
# the rest (libssl3, libffi8, ...).
PACKAGES=python3.11-minimal,libpython3.11-stdlib,libc6,libstdc++6,libgcc-s1,zlib1g
# Bump when the way the root is assembled changes, so cached roots are rebuilt.
ROOT_LAYOUT=2

WEIGHTS=$SHARED/weights/mobilenet_v3_small-tfslim-8bit.pth
IMAGE=$SHARED/images/grace_hopper.jpg
MODEL_IN_ROOT=/models/mobilenet_v3_small.onnx

# Emulation is ~250x slower than native: a small batch keeps warm-up short, and generous
# timeouts keep a slow-but-correct server from failing the test.
SERVER_ENV=(
    MNV3_HTTP_HOST=127.0.0.1
    MNV3_MAX_BATCH_SIZE=2
    MNV3_INTRA_OP_THREADS=2
    MNV3_DECODE_THREADS=1
    MNV3_REQUEST_TIMEOUT_MS=120000
)
READY_TIMEOUT_S=600
STOP_TIMEOUT_S=120

log() { printf '[arm64-smoke] %s\n' "$*"; }
die() {
    printf '[arm64-smoke] FAILED: %s\n' "$*" >&2
    exit 1
}
now_ms() { date +%s%3N; }
seconds_since() { # $1 = start in ms -> "12.3"
    local ms=$(($(now_ms) - $1))
    printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

# --- servers started by this script: stopped on every exit, by PID only -------------------

X86_PID=
ARM_PID=

stop_server() { # $1 = PID; sets STOP_RC to its exit code (KILL after STOP_TIMEOUT_S)
    local pid=$1 deadline=$((SECONDS + STOP_TIMEOUT_S))
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "server $pid ignored SIGTERM for ${STOP_TIMEOUT_S} s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    STOP_RC=0
    wait "$pid" || STOP_RC=$?
}

cleanup() {
    local pid
    for pid in $X86_PID $ARM_PID; do
        # To stderr: a trap can run while a command's stdout is still redirected to /dev/null.
        log "cleanup: stopping server $pid" >&2
        stop_server "$pid"
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM # run the EXIT trap on Ctrl-C or a test runner's SIGTERM too

show_log_and_die() { # $1 = log file, $2 = message
    log "last lines of $1:"
    tail -n 40 "$1" >&2 || true
    die "$2"
}

# --- preconditions: fail with the fix, not with a confusing error later -------------------

[ "$(id -u)" -eq 0 ] || die "must run as root (chroot)"
for tool in debootstrap dpkg-deb chroot; do
    command -v "$tool" >/dev/null ||
        die "$tool missing: apt-get install -y --no-install-recommends qemu-user-static debootstrap debian-archive-keyring"
done
# Absolute: the environment given to the root (env -i below) has the root's PATH, not ours.
CHROOT=$(command -v chroot)
[ -x "$QEMU" ] || die "$QEMU missing: apt-get install -y --no-install-recommends qemu-user-static"
[ -x "$HOST_PY" ] || die "$HOST_PY missing: run 'make' first (it creates .venv)"
[ -f "$REPO/deploy/install-wheels.sh" ] || die "deploy/install-wheels.sh missing"
for file in "$WEIGHTS" "$IMAGE"; do
    [ -f "$file" ] || die "$file missing (real weights and photos come from ../shared or MNV3_SHARED)"
done
mkdir -p "$WORK"

# --- 1. the aarch64 root ----------------------------------------------------------------

# Deleting a root with something mounted inside would delete the mounted tree; this script
# never mounts anything, so refuse rather than guess.
safe_rm_root() { # $1 = dir under $BUILD
    if grep -qF " $1" /proc/mounts; then die "something is mounted under $1"; fi
    rm -rf "$1"
}

build_base() {
    local debs=$BUILD/arm64-debs partial=$ROOT.partial
    log "fetching Debian $SUITE arm64 packages with debootstrap (log: $WORK/debootstrap.log)"
    safe_rm_root "$debs"
    safe_rm_root "$partial"
    # --download-only: the signed, checksummed .debs with dependencies resolved, nothing
    # else. A --foreign first stage would unpack only the Essential set and leave the rest
    # (python3.11) to a second stage that cannot run without binfmt_misc; we unpack all here.
    # Two tries: the only network step, and a mirror hiccup should not fail CI.
    local try
    for try in 1 2; do
        debootstrap --download-only --variant=minbase --arch=arm64 --include="$PACKAGES" \
            "$SUITE" "$debs" >"$WORK/debootstrap.log" 2>&1 && break
        [ "$try" -eq 2 ] && show_log_and_die "$WORK/debootstrap.log" "debootstrap failed twice"
        log "debootstrap failed; retrying in 10 s"
        sleep 10
    done
    log "unpacking $(find "$debs/var/cache/apt/archives" -name '*.deb' | wc -l) packages with dpkg-deb -x"
    mkdir -p "$partial"
    local deb
    for deb in "$debs"/var/cache/apt/archives/*.deb; do
        dpkg-deb -x "$deb" "$partial"
    done
    # The few device nodes a process expects (no /dev is mounted): grpc's abseil aborts
    # without /dev/urandom to seed from.
    mknod -m 666 "$partial/dev/null" c 1 3
    mknod -m 666 "$partial/dev/zero" c 1 5
    mknod -m 666 "$partial/dev/random" c 1 8
    mknod -m 666 "$partial/dev/urandom" c 1 9
    # grpc resolves "localhost" itself; nothing in minbase writes /etc/hosts.
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$partial/etc/hosts"
    echo "$base_key" >"$partial/.mnv3-base-stamp"
    safe_rm_root "$ROOT"
    mv "$partial" "$ROOT" # the root appears only when complete
    safe_rm_root "$debs"
}

install_wheels() {
    local partial=$ROOT/opt/site.partial
    log "installing aarch64 wheels with deploy/install-wheels.sh (log: $WORK/wheels.log)"
    rm -rf "$partial"
    PYTHON=$HOST_PY sh "$REPO/deploy/install-wheels.sh" arm64 "$partial" >"$WORK/wheels.log" 2>&1 ||
        show_log_and_die "$WORK/wheels.log" "install-wheels.sh failed"
    echo "$wheels_key" >"$partial/.mnv3-wheels-stamp"
    rm -rf "$ROOT/opt/site"
    mv "$partial" "$ROOT/opt/site"
}

setup_start=$(now_ms)
base_key="suite=$SUITE packages=$PACKAGES layout=$ROOT_LAYOUT"
if [ "$(cat "$ROOT/.mnv3-base-stamp" 2>/dev/null)" = "$base_key" ]; then
    log "reusing $ROOT (stamp matches)"
else
    build_base
fi

# The qemu binary is copied every run: the host's may have been upgraded since.
cp "$QEMU" "$ROOT/usr/bin/qemu-aarch64-static"

wheels_key=$(cat "$REPO/deploy/requirements.txt" "$REPO/deploy/install-wheels.sh" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$ROOT/opt/site/.mnv3-wheels-stamp" 2>/dev/null)" = "$wheels_key" ]; then
    log "reusing $ROOT/opt/site (requirements unchanged)"
else
    install_wheels
fi

# The code under test and the model are refreshed every run: they are what changes.
rm -rf "$ROOT/app" "$ROOT/smoke" "$ROOT/models"
mkdir -p "$ROOT/app" "$ROOT/smoke" "$ROOT/models"
cp -a "$REPO/service" "$ROOT/app/service"
find "$ROOT/app" -name __pycache__ -prune -exec rm -rf {} +
cp "$REPO/deploy/arm64/probe.py" "$ROOT/smoke/probe.py"

# --- 2. the model (exported on the host) and the x86 reference --------------------------

log "exporting MobileNetV3-Small from $WEIGHTS (padding and mean/std from its manifest)"
(cd "$REPO" && "$HOST_PY" -m models.export --arch small --weights "$WEIGHTS" \
    --out "$ROOT$MODEL_IN_ROOT") >"$WORK/export.log" 2>&1 ||
    show_log_and_die "$WORK/export.log" "model export failed"
echo "TIMING setup: $(seconds_since "$setup_start") s (root $(du -sh "$ROOT" | cut -f1))"

# One aarch64 process in the root: the environment is given here, on the host side, and
# env -i keeps host settings (venv paths, OPENBLAS_CORETYPE for x86 CPUs, ...) out of it.
ROOT_ENV=(PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 PYTHONPATH=/opt/site:/app PYTHONUNBUFFERED=1)
in_root() { # ARGV... as run by the aarch64 root
    env -i "${ROOT_ENV[@]}" "$CHROOT" "$ROOT" /usr/bin/qemu-aarch64-static "$@"
}

# 4 (first, it is quick). Proof that the code runs as aarch64 and onnxruntime is the aarch64
# wheel, and that its numbers equal x86's on the real model.
machine=$(in_root /bin/uname -m)
echo "PROOF uname -m via qemu: $machine"
[ "$machine" = aarch64 ] || die "uname -m in the root printed '$machine', not aarch64"

"$HOST_PY" "$REPO/deploy/arm64/probe.py" run "$ROOT$MODEL_IN_ROOT" "$ROOT/smoke" x86_64 ||
    die "x86_64 probe failed"
probe_start=$(now_ms)
in_root /usr/bin/python3.11 /smoke/probe.py run "$MODEL_IN_ROOT" /smoke aarch64 \
    2>"$WORK/probe-aarch64.log" || show_log_and_die "$WORK/probe-aarch64.log" "aarch64 probe failed"
echo "TIMING aarch64 probe (start python + import + load + 1 batch of 2): $(seconds_since "$probe_start") s"
"$HOST_PY" "$REPO/deploy/arm64/probe.py" compare "$ROOT/smoke" || die "logits differ"

# --- 3. the real server: x86 on the host for the reference, then aarch64 in the root -----

read -r X86_HTTP X86_GRPC ARM_HTTP ARM_GRPC < <("$HOST_PY" -c '
import socket
# Four distinct free loopback ports, held open together so none repeats.
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')

check() { "$HOST_PY" "$REPO/deploy/arm64/check_server.py" "$@"; }

log "x86 reference server on 127.0.0.1:$X86_HTTP (gRPC $X86_GRPC)"
(cd "$REPO" && exec env "${SERVER_ENV[@]}" MNV3_MODEL_PATH="$ROOT$MODEL_IN_ROOT" \
    MNV3_HTTP_PORT="$X86_HTTP" MNV3_GRPC_PORT="$X86_GRPC" \
    "$HOST_PY" -m service) >"$WORK/server-x86_64.log" 2>&1 &
X86_PID=$!
check wait --http-port "$X86_HTTP" --pid "$X86_PID" --timeout 120 >/dev/null ||
    show_log_and_die "$WORK/server-x86_64.log" "x86 server did not become ready"
check check --name x86_64 --http-port "$X86_HTTP" --grpc-port "$X86_GRPC" --image "$IMAGE" \
    --acceptable "$SHARED/images/EXPECTED.json" --json "$WORK/reference.json" ||
    show_log_and_die "$WORK/server-x86_64.log" "x86 server checks failed"
stop_server "$X86_PID"
X86_PID=
[ "$STOP_RC" -eq 0 ] || show_log_and_die "$WORK/server-x86_64.log" "x86 server exited $STOP_RC after SIGTERM"

log "aarch64 server on 127.0.0.1:$ARM_HTTP (gRPC $ARM_GRPC), log: $WORK/server-aarch64.log"
start=$(now_ms)
# A plain command, not a function, so that $! is the server itself (env, chroot and qemu
# each exec the next) and SIGTERM reaches it.
env -i "${ROOT_ENV[@]}" "${SERVER_ENV[@]}" MNV3_MODEL_PATH="$MODEL_IN_ROOT" \
    MNV3_HTTP_PORT="$ARM_HTTP" MNV3_GRPC_PORT="$ARM_GRPC" \
    "$CHROOT" "$ROOT" /usr/bin/qemu-aarch64-static /usr/bin/python3.11 -m service \
    >"$WORK/server-aarch64.log" 2>&1 &
ARM_PID=$!
check wait --http-port "$ARM_HTTP" --pid "$ARM_PID" --timeout "$READY_TIMEOUT_S" >/dev/null ||
    show_log_and_die "$WORK/server-aarch64.log" "aarch64 server did not become ready"
echo "TIMING aarch64 server ready (start to /readyz 200, incl. warm-up): $(seconds_since "$start") s"
check check --name aarch64 --http-port "$ARM_HTTP" --grpc-port "$ARM_GRPC" --image "$IMAGE" \
    --reference "$WORK/reference.json" ||
    show_log_and_die "$WORK/server-aarch64.log" "aarch64 server checks failed"
start=$(now_ms)
stop_server "$ARM_PID"
ARM_PID=
echo "PROOF aarch64 server exit code after SIGTERM: $STOP_RC (took $(seconds_since "$start") s)"
[ "$STOP_RC" -eq 0 ] || show_log_and_die "$WORK/server-aarch64.log" "aarch64 server exited $STOP_RC"

echo "arm64-smoke: OK"
