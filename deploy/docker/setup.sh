#!/bin/sh
# The steps the image stages of deploy/docker/Dockerfile share, one sub-command each, so that the API
# and worker targets run the same code on whatever base they start from. POSIX sh: a minbase Debian
# has dash, not bash.
#
#   setup.sh python          Python >= 3.11 with venv: the base's own, else the distribution's packages
#   setup.sh deps [REQ...]   /opt/gpujobs/venv with every wheel of /wheels (and REQ, from them) installed
#   setup.sh project         the gpujobs wheel of /project into it, then `pip check`
#   setup.sh user            the non-root user 10001 and its one writable place, /var/lib/gpujobs
set -eu

VENV=/opt/gpujobs/venv
STATE=/var/lib/gpujobs
USER_ID=10001

has_python() {
    python3 -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

case "${1:-}" in
python)
    if has_python; then
        echo "setup.sh: $(python3 --version) with venv is in the base image"
        exit 0
    fi
    # A base without it (a CUDA base on Ubuntu 24.04 brings Python 3.12 this way): the distribution's own
    # python3, so that its security updates come with the base image's. This is the only step that may
    # reach a package mirror; the base that deploy/docker/base.sh builds never takes it.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends python3 python3-venv ca-certificates
    rm -rf /var/lib/apt/lists/*
    has_python || { echo "setup.sh: the base's python3 is older than 3.11" >&2; exit 1; }
    ;;
deps)
    shift
    python3 -m venv "$VENV"
    # The wheelhouse of the role holds exactly the dependency closure resolved on the host, one version
    # of each: installing all of it installs those pins and nothing else, with no index and no network.
    # REQ (the worker's torch build) must be among them, or pip says so here.
    "$VENV/bin/pip" install --no-cache-dir --no-index --find-links /wheels --disable-pip-version-check \
        "$@" /wheels/*.whl
    ;;
project)
    # A layer of its own: a code change rebuilds this, not the dependency layer above.
    "$VENV/bin/pip" install --no-cache-dir --no-index --no-deps --disable-pip-version-check /project/gpujobs-*.whl
    rm -rf /project
    "$VENV/bin/pip" check
    ;;
user)
    # Appended by hand: minbase Debian has no useradd (passwd is not essential).
    grep -q "^gpujobs:" /etc/group || echo "gpujobs:x:$USER_ID:" >>/etc/group
    grep -q "^gpujobs:" /etc/passwd ||
        echo "gpujobs:x:$USER_ID:$USER_ID:gpujobs:$STATE:/usr/sbin/nologin" >>/etc/passwd
    mkdir -p "$STATE"
    chown "$USER_ID:$USER_ID" "$STATE"
    chmod 0750 "$STATE"
    ;;
*)
    echo "usage: setup.sh python | deps [REQ...] | project | user" >&2
    exit 2
    ;;
esac
