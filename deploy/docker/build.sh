#!/usr/bin/env bash
# Build the gpujobs images on this machine, with no registry and no network during the image builds:
#
#   1. the base image (deploy/docker/base.sh: debootstrap, cached by a hash of its inputs);
#   2. a wheelhouse per role made on the host with the project's venv (var/wheelhouse/api-<hash>,
#      var/wheelhouse/worker-<hash>: the dependencies of gpujobs[api] and of gpujobs[worker] at the
#      versions that venv has, the worker's with the torch build TORCH; reused while pyproject.toml,
#      TORCH and this script stay the same), and a wheel of the project itself, built every time;
#   3. gpujobs-api:$TAG and gpujobs-worker:$TAG from deploy/docker/Dockerfile, both on that base.
#
# Environment: PIP (the venv's pip; default .venv/bin/pip), TORCH (default torch==2.13.0, the CPU wheel
# that this machine's pip configuration finds), TAG (default: the git revision, and also `latest`).
# Prints a line per step with its wall time on stderr.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/../.."
here=deploy/docker

PIP=${PIP:-.venv/bin/pip}
PYTHON=$(dirname "$PIP")/python
TORCH=${TORCH:-torch==2.13.0}
REVISION=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
TAG=${TAG:-$REVISION}
WHEELHOUSE=var/wheelhouse
CONTEXT=var/docker-context

note() { echo "build.sh: $*" >&2; }
timed() {  # timed LABEL COMMAND...: run it, then say how long it took
    local label=$1 start=$SECONDS
    shift
    "$@"
    note "$label: $((SECONDS - start)) s"
}

# The legacy builder needs nothing more than dockerd; BuildKit needs the buildx plugin on the client.
# The Dockerfile works with both; use BuildKit where it is here.
if docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=1; else export DOCKER_BUILDKIT=0; fi
note "builder: $([ "$DOCKER_BUILDKIT" = 1 ] && echo BuildKit || echo legacy)"

base=$(timed "base image" "$here/base.sh")

# The image's Python decides the environment markers (deploy/docker/wheelhouse.py says why).
markers=$(docker run --rm --network host "$base" python3 -c "$("$PYTHON" "$here/wheelhouse.py" --probe)")

# wheelhouse ROLE EXTRA [REQ...]: the dependency closure of gpujobs[EXTRA] and REQ (gpujobs itself left
# out) in var/wheelhouse, at the versions of the venv that `make test` tested (its freeze, as
# constraints; torch is TORCH's), completed for the image's Python. Keyed on pyproject.toml, TORCH, the
# base image and these scripts; reused while they stay the same. Prints the folder.
wheelhouse() {
    local role=$1 extra=$2 key dir lacking round
    shift 2
    key=$( { cat pyproject.toml "$0" "$here/wheelhouse.py"; echo "$TORCH $base"; } | sha256sum | cut -c1-16)
    dir=$WHEELHOUSE/$role-$key
    if [ -f "$dir/.complete" ]; then
        note "wheelhouse $dir is complete already"
    else
        rm -rf "$dir.partial" && mkdir -p "$dir.partial"
        "$PIP" freeze --exclude-editable | grep -viE '^(torch|gpujobs)( |=|@)' >"$dir.partial/constraints.txt"
        "$PIP" wheel --quiet --no-build-isolation --wheel-dir "$dir.partial" \
            --constraint "$dir.partial/constraints.txt" "$@" ".[$extra]" >&2
        for round in 1 2 3 4 5; do
            lacking=$("$PYTHON" "$here/wheelhouse.py" "$dir.partial" "$markers" "gpujobs[$extra]" "$@")
            [ -z "$lacking" ] && break
            note "the image's Python also needs (round $round): $(echo "$lacking" | tr '\n' ' ')"
            # shellcheck disable=SC2086  # one requirement a line, none with spaces
            "$PIP" wheel --quiet --wheel-dir "$dir.partial" --constraint "$dir.partial/constraints.txt" $lacking >&2
        done
        [ -z "$lacking" ] || { note "wheelhouse $dir still lacks: $lacking"; return 1; }
        rm -f "$dir.partial"/gpujobs-*.whl "$dir.partial/constraints.txt"
        touch "$dir.partial/.complete"
        rm -rf "$dir" && mv "$dir.partial" "$dir"
    fi
    # Wheelhouses of an older pyproject.toml, torch or base are not needed any more.
    find "$WHEELHOUSE" -mindepth 1 -maxdepth 1 -name "$role-*" ! -name "$role-$key" -exec rm -rf {} +
    echo "$dir"
}
api_wheels=$(timed "wheelhouse (api)" wheelhouse api api)
worker_wheels=$(timed "wheelhouse (worker)" wheelhouse worker worker "$TORCH")

# The context: the wheels (hard links, no copy), the project's wheel and setup.sh; nothing else.
rm -rf "$CONTEXT" && mkdir -p "$CONTEXT/wheels-api" "$CONTEXT/wheels-worker" "$CONTEXT/project"
timed "project wheel" "$PIP" wheel --quiet --no-deps --no-build-isolation --wheel-dir "$CONTEXT/project" . >&2
rm -rf build  # setuptools' scratch folder
cp -l "$api_wheels"/*.whl "$CONTEXT/wheels-api/"
cp -l "$worker_wheels"/*.whl "$CONTEXT/wheels-worker/"
cp "$here/setup.sh" "$CONTEXT/"

build() {  # build TARGET IMAGE [--build-arg ...]
    local target=$1 image=$2
    shift 2
    docker build --network host --file "$here/Dockerfile" --target "$target" \
        --build-arg "BASE_IMAGE=$base" \
        --build-arg "VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)" \
        --build-arg "REVISION=$REVISION" \
        --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        "$@" --tag "$image:$TAG" --tag "$image:latest" "$CONTEXT" >&2
}
timed "gpujobs-api image" build api gpujobs-api
timed "gpujobs-worker image" build worker gpujobs-worker \
    --build-arg "WORKER_BASE_IMAGE=$base" --build-arg "TORCH=$TORCH"
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^gpujobs-(api|worker|base):' >&2
