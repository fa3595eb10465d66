#!/bin/bash
# harpoon on a Mac, end to end: what to run on a real Mac, and paste into an issue.
#
# Runs each check below against a containerd that is already running (this script
# starts none), goes on after a failed step, removes its containers, and prints a
# markdown table: check | result | seconds | detail.
#
#   guest build   `harpoon guest build --arch GUEST_ARCH` (arm64 on Apple silicon)
#   doctor        `harpoon doctor` (after the build, so that a fresh Mac's missing guest
#                 image is not what it reports)
#   containerd    `ctr version` at CONTAINERD_ADDRESS
#   image         pull IMAGE (or import IMAGE_TAR) for linux/GUEST_ARCH into SNAPSHOTTER
#   uname         `ctr run --runtime RUNTIME --snapshotter SNAPSHOTTER IMAGE uname -m`:
#                 the guest's machine, and the time from `ctr run` to its first output
#   bind ro       a host directory bound read-only: reading works, writing fails
#   port          busybox httpd on port 80 published on 127.0.0.1:PORT through harpoon's
#                 user-mode network (annotation io.harpoon.network.ports), fetched with
#                 curl from the host
#
# Everything is overridable by the environment (defaults in brackets), so the same
# script runs on Linux against another backend (HARPOON_VMM=vfkit HARPOON_VFKIT=<double>):
#   CONTAINERD_ADDRESS [/var/run/containerd/containerd.sock]  CTR [ctr]
#   NAMESPACE [harpoon-smoke]  RUNTIME [io.containerd.harpoon.v1]  SNAPSHOTTER [erofs]
#   IMAGE [docker.io/library/busybox:latest]  IMAGE_TAR [none: pull IMAGE]
#   GUEST_ARCH [the host's: arm64 or amd64]  PORT [18080]  HARPOON [harpoon]
#   PYTHON [python3]  SKIP_GUEST_BUILD [0]  RUN_TIMEOUT [300 seconds per step]
# The `uname` and `bind ro` containers use `--net-host` (harpoon's user-mode network for
# the VM): a Mac has no network namespace to give a VM. It needs root only where
# containerd's socket does.
#
# Written for macOS's /bin/bash (3.2): no associative arrays, no `date +%N`.

set -u

CONTAINERD_ADDRESS=${CONTAINERD_ADDRESS:-/var/run/containerd/containerd.sock}
CTR=${CTR:-ctr}
NAMESPACE=${NAMESPACE:-harpoon-smoke}
RUNTIME=${RUNTIME:-io.containerd.harpoon.v1}
SNAPSHOTTER=${SNAPSHOTTER:-erofs}
IMAGE=${IMAGE:-docker.io/library/busybox:latest}
IMAGE_TAR=${IMAGE_TAR:-}
PORT=${PORT:-18080}
HARPOON=${HARPOON:-harpoon}
PYTHON=${PYTHON:-python3}
SKIP_GUEST_BUILD=${SKIP_GUEST_BUILD:-0}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
case "$(uname -m)" in
  arm64 | aarch64) host_arch=arm64 ;;
  x86_64 | amd64) host_arch=amd64 ;;
  *) host_arch=$(uname -m) ;;
esac
GUEST_ARCH=${GUEST_ARCH:-$host_arch}
case "$GUEST_ARCH" in
  arm64) guest_machine=aarch64 ;;
  amd64) guest_machine=x86_64 ;;
  *) guest_machine=$GUEST_ARCH ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/harpoon-smoke.XXXXXX")
rows="$work/rows"
: >"$rows"
prefix="smoke-$$"

now() { "$PYTHON" -c 'import time; print("%.2f" % time.time())'; }
elapsed() { "$PYTHON" -c "import sys; print('%.2f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$1" "$2"; }
# One line of a file, made fit for a table cell.
cell() { tr '\n|' ' /' | sed -e 's/  */ /g' -e 's/^ //' -e 's/ $//' | cut -c1-160; }
# The end of a command's error output, without containerd's warnings.
errors() { grep -v 'level=warning' "$1" | tail -n 2 | cell; }
row() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >>"$rows"; }

ctr_() { "$CTR" --address "$CONTAINERD_ADDRESS" --namespace "$NAMESPACE" "$@"; }

# Runs "$@" with a time limit (macOS has no timeout(1)); its exit status, 124 on timeout.
limited() {
  "$PYTHON" - "$RUN_TIMEOUT" "$@" <<'EOF'
import subprocess, sys
try:
    sys.exit(subprocess.run(sys.argv[2:], timeout=float(sys.argv[1])).returncode)
except subprocess.TimeoutExpired:
    sys.exit(124)
EOF
}

# Runs "$@" with its stdout into $work/out, and prints the seconds from now until its
# first byte of output (or until it ended, if it printed nothing). Status as "$@"'s.
first_output() {
  "$PYTHON" - "$RUN_TIMEOUT" "$work/out" "$@" <<'EOF'
import os, select, subprocess, sys, time
began = time.time()
deadline = began + float(sys.argv[1])
with open(sys.argv[2], "wb") as out:
    process = subprocess.Popen(sys.argv[3:], stdout=subprocess.PIPE)
    first = None
    try:
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise subprocess.TimeoutExpired(sys.argv[3:], float(sys.argv[1]))
            if not select.select([process.stdout], [], [], left)[0]:
                continue
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            if first is None:
                first = time.time()
            out.write(chunk)
        status = process.wait(max(deadline - time.time(), 0.1))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        status = 124
print("%.2f" % ((first or time.time()) - began))
sys.exit(status)
EOF
}

remove_container() {
  ctr_ task kill --signal SIGKILL "$1" >/dev/null 2>&1
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    ctr_ task delete "$1" >/dev/null 2>&1 && break
    ctr_ task ls -q 2>/dev/null | grep -qx "$1" || break
    sleep 1
  done
  ctr_ container delete "$1" >/dev/null 2>&1
}

cleanup() {
  for name in $(ctr_ container ls -q 2>/dev/null | grep "^$prefix-"); do
    remove_container "$name"
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- the guest image ---------------------------------------------------------------------
if [ "$SKIP_GUEST_BUILD" = 1 ]; then
  row "guest build" skip - "SKIP_GUEST_BUILD=1"
else
  start=$(now)
  if "$HARPOON" guest build --arch "$GUEST_ARCH" >"$work/guest" 2>&1; then
    row "guest build" pass "$(elapsed "$start" "$(now)")" "$GUEST_ARCH: $(tail -n 1 "$work/guest" | cell)"
  else
    row "guest build" FAIL "$(elapsed "$start" "$(now)")" "$(tail -n 3 "$work/guest" | cell)"
  fi
fi

# -- doctor ------------------------------------------------------------------------------
start=$(now)
if "$HARPOON" doctor >"$work/doctor" 2>&1; then
  row doctor pass "$(elapsed "$start" "$(now)")" "$(grep -c '^ok' "$work/doctor") checks ok"
else
  row doctor FAIL "$(elapsed "$start" "$(now)")" \
    "$(grep -E '^(MISSING|missing)' "$work/doctor" | sed 's/; fix:.*//' | cell)"
fi

# -- containerd and the image -----------------------------------------------------------
start=$(now)
if ctr_ version >"$work/version" 2>&1; then
  row containerd pass "$(elapsed "$start" "$(now)")" \
    "$CONTAINERD_ADDRESS: server $(sed -n '/Server/,$ s/^ *Version: *//p' "$work/version" | cell)"
else
  row containerd FAIL "$(elapsed "$start" "$(now)")" "$(cell <"$work/version")"
fi

start=$(now)
if [ -n "$IMAGE_TAR" ]; then
  got="import $IMAGE_TAR"
  limited "$CTR" --address "$CONTAINERD_ADDRESS" --namespace "$NAMESPACE" images import \
    --platform "linux/$GUEST_ARCH" --snapshotter "$SNAPSHOTTER" "$IMAGE_TAR" >"$work/image" 2>&1
else
  got="pull $IMAGE"
  limited "$CTR" --address "$CONTAINERD_ADDRESS" --namespace "$NAMESPACE" images pull \
    --platform "linux/$GUEST_ARCH" --snapshotter "$SNAPSHOTTER" "$IMAGE" >"$work/image" 2>&1
fi
status=$?
if [ $status = 0 ] && ctr_ images ls -q 2>/dev/null | grep -qx "$IMAGE"; then
  row image pass "$(elapsed "$start" "$(now)")" "$got (linux/$GUEST_ARCH, $SNAPSHOTTER)"
else
  row image FAIL "$(elapsed "$start" "$(now)")" "$got: $(errors "$work/image")"
fi

run_args() {
  echo --runtime "$RUNTIME" --snapshotter "$SNAPSHOTTER" --platform "linux/$GUEST_ARCH"
}

# -- uname -m in the guest, and the time to its first output ------------------------------
name="$prefix-uname"
# shellcheck disable=SC2046 # run_args's words are flags without spaces
seconds=$(first_output "$CTR" --address "$CONTAINERD_ADDRESS" --namespace "$NAMESPACE" run --rm \
  --net-host $(run_args) "$IMAGE" "$name" uname -m 2>"$work/err")
status=$?
machine=$(cell <"$work/out")
if [ $status = 0 ] && [ "$machine" = "$guest_machine" ]; then
  row "uname -m" pass "$seconds" "$machine (time to first output)"
else
  row "uname -m" FAIL "$seconds" "status $status, printed '$machine', wanted $guest_machine: $(errors "$work/err")"
fi
remove_container "$name"

# -- a read-only bind mount ------------------------------------------------------------
name="$prefix-bind"
mkdir -p "$work/shared"
echo "from the host" >"$work/shared/hello"
start=$(now)
# shellcheck disable=SC2046
limited "$CTR" --address "$CONTAINERD_ADDRESS" --namespace "$NAMESPACE" run --rm --net-host \
  $(run_args) --mount "type=bind,src=$work/shared,dst=/data,options=rbind:ro" "$IMAGE" "$name" \
  sh -c 'cat /data/hello; if echo x >/data/written 2>/dev/null; then echo WROTE; else echo REFUSED; fi' \
  >"$work/out" 2>"$work/err"
status=$?
seconds=$(elapsed "$start" "$(now)")
said=$(cell <"$work/out")
if [ $status = 0 ] && [ "$said" = "from the host REFUSED" ] && [ ! -e "$work/shared/written" ]; then
  row "bind ro" pass "$seconds" "read: from the host; write: refused"
else
  row "bind ro" FAIL "$seconds" "status $status, printed '$said': $(errors "$work/err")"
fi
remove_container "$name"

# -- a published port through harpoon's user-mode network -----------------------------------
name="$prefix-http"
start=$(now)
# shellcheck disable=SC2046
if limited "$CTR" --address "$CONTAINERD_ADDRESS" --namespace "$NAMESPACE" run -d $(run_args) \
  --annotation "io.harpoon.network.ports=127.0.0.1:$PORT:80" "$IMAGE" "$name" \
  sh -c 'mkdir -p /www && echo harpoon-smoke >/www/index.html && exec httpd -f -p 80 -h /www' \
  >"$work/err" 2>&1; then
  body=""
  deadline=$(($(date +%s) + RUN_TIMEOUT))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    body=$(curl -fsS --max-time 5 "http://127.0.0.1:$PORT/" 2>"$work/curl") && break
    body=""
    sleep 0.5
  done
  seconds=$(elapsed "$start" "$(now)")
  if [ "$body" = harpoon-smoke ]; then
    row port pass "$seconds" "curl http://127.0.0.1:$PORT/ answered (time from ctr run)"
  else
    row port FAIL "$seconds" "no answer on 127.0.0.1:$PORT: $(tail -n 1 "$work/curl" | cell)"
  fi
else
  row port FAIL "$(elapsed "$start" "$(now)")" "$(errors "$work/err")"
fi
remove_container "$name"

# -- the table ---------------------------------------------------------------------------
system="$(uname -srm)"
if command -v sw_vers >/dev/null 2>&1; then
  system="macOS $(sw_vers -productVersion) ($system)"
fi
echo
echo "harpoon smoke: $system; VMM ${HARPOON_VMM:-default}; runtime $RUNTIME; snapshotter $SNAPSHOTTER; image $IMAGE"
echo
echo "| check | result | seconds | detail |"
echo "|---|---|---|---|"
cat "$rows"
! grep -q '| FAIL |' "$rows"
