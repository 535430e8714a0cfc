#!/usr/bin/env bash
# Build the local base image of both gpujobs images with debootstrap: Debian bookworm, --variant=minbase,
# plus the Python 3.11 that the project needs (python3, python3-venv) and ca-certificates. Nothing is
# pulled from a registry: the root filesystem comes from the Debian mirror that this machine's own apt
# sources name (read here, at run time; no host name is written into the repository), and `docker import`
# makes it an image.
#
# The image is tagged by a hash of its inputs (this script, the mirror, the suite, the packages), so a
# second run finds it and does nothing. Prints the tag on stdout; everything else goes to stderr.
#
#   deploy/docker/base.sh            # -> gpujobs-base:bookworm-<hash>
#   BASE_REPO=my-base deploy/docker/base.sh
set -euo pipefail

SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
BASE_REPO=${BASE_REPO:-gpujobs-base}
here=$(cd "$(dirname "$0")" && pwd)
note() { echo "base.sh: $*" >&2; }

mirror=$(python3 "$here/apt_mirror.py" "$SUITE")
digest=$( { cat "$0" "$here/apt_mirror.py"; echo "$mirror $SUITE $PACKAGES"; } | sha256sum | cut -c1-12)
tag="$BASE_REPO:$SUITE-$digest"
if docker image inspect "$tag" >/dev/null 2>&1; then
    note "$tag is built already"
    echo "$tag"
    exit 0
fi

command -v debootstrap >/dev/null || { note "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
rootfs=$(mktemp -d "${TMPDIR:-/tmp}/gpujobs-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
note "debootstrap $SUITE (minbase + $PACKAGES) from this machine's mirror into $rootfs"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" >&2 \
    || { note "debootstrap failed; its log:"; cat "$rootfs/debootstrap/debootstrap.log" >&2 || true; exit 1; }
# No package cache or lists in the image (the images install no Debian package after this).
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'CMD ["/bin/bash"]' \
    --change "LABEL org.opencontainers.image.title=gpujobs-base" \
    --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase with Python 3 (debootstrap)\"" \
    --change "LABEL org.opencontainers.image.created=$created" \
    --change "LABEL org.opencontainers.image.version=$SUITE-$digest" \
    - "$tag" >&2
note "built $tag"
echo "$tag"
