#!/usr/bin/env bash
# Builds and checks the container image with podman, where there is no Docker
# engine and no image registry. Run as root on Debian or Ubuntu.
#
#   ./scripts/image.sh build [DIR]   build localhost/wsgate:VERSION into podman storage under DIR
#   ./scripts/image.sh test          build it in a temporary folder, run tests/test_image.py on it,
#                                    and remove the folder (the test calls build and clean itself)
#   ./scripts/image.sh size DIR      the image's compressed size (podman save | gzip), and its base's
#   ./scripts/image.sh clean DIR     remove every container and image under DIR, then DIR
#
# No registry is needed: the bases are Debian bookworm, made by debootstrap
# from the mirror apt uses, with Debian's python3 in a venv standing in for
# python:3.12 and python:3.12-slim (passed through the Dockerfile's BUILD_IMAGE
# and RUNTIME_IMAGE). DIR holds podman's config and storage, so nothing is
# written to /etc/containers or /var/lib/containers; after `build`,
#   source DIR/env && podman run --rm --network host localhost/wsgate:VERSION --version
# runs the image. DIR defaults to a new temporary folder, whose name `build` prints.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    sed -n '5,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

need_tools() {
    local missing=()
    for tool in podman runc debootstrap; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "image.sh: install ${missing[*]} (apt-get install podman runc debootstrap)" >&2
        exit 1
    fi
}

# The URI apt fetches bookworm's main archive from, in one-line or deb822 sources.
debian_mirror() {
    local uri
    uri=$(awk '$1 == "deb" { for (i = 2; i < NF; i++) if ($i ~ /:\/\// && $(i + 1) == "bookworm") { print $i; exit } }' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
    if [ -z "$uri" ]; then
        uri=$(awk 'BEGIN { RS = "" }
            /(^|\n)Suites:[^\n]*[ \t]bookworm([ \t\n]|$)/ && match($0, /URIs:[ \t]*[^ \t\n]+/) {
                uri = substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", uri); print uri; exit
            }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    fi
    echo "${WSGATE_DEBIAN_MIRROR:-${uri:-http://deb.debian.org/debian}}"
}

# Only a folder `build` made is measured or removed, never one that merely exists.
made_by_build() {
    [ -d "$1" ] && [ -f "$1/env" ] && [ -f "$1/storage.conf" ] || {
        echo "image.sh: $1 is not a folder that image.sh build made" >&2
        exit 2
    }
}

# Podman's config and storage under $dir, for this shell and the file `$dir/env`.
use_dir() {
    dir="$1"
    mkdir -p "$dir/tmp"
    dir="$(cd "$dir" && pwd)"
    # crun refuses some cgroup layouts; runc runs on them. The default limits ask
    # for more open files than some machines allow a process: take the hard limit.
    cat >"$dir/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=32768:32768"]
[engine]
runtime = "runc"
tmp_dir = "$dir/libpod"
EOF
    cat >"$dir/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$dir/storage"
runroot = "$dir/run"
EOF
    cat >"$dir/env" <<EOF
export CONTAINERS_CONF="$dir/containers.conf" CONTAINERS_STORAGE_CONF="$dir/storage.conf" TMPDIR="$dir/tmp"
EOF
    # shellcheck source=/dev/null
    source "$dir/env"
}

version() {
    sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/wsgate/__init__.py"
}

image_name() {
    echo "localhost/wsgate:$(version)"
}

# Podman builds on the host's network: its default bridge rewrites the firewall.
build_flags=(--network host --pull=never)

# Debian bookworm as an image, then the two stand-ins for the python: images.
build_bases() {
    local base=localhost/wsgate-standin/debian:bookworm
    if ! podman image exists "$base"; then
        local rootfs="$dir/rootfs"
        echo "image.sh: debootstrap bookworm from $(debian_mirror)" >&2
        debootstrap --variant=minbase bookworm "$rootfs" "$(debian_mirror)" >"$dir/debootstrap.log" 2>&1 \
            || { tail -20 "$dir/debootstrap.log" >&2; exit 1; }
        # What debian:bookworm-slim leaves out as well: package files, indexes, docs.
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
            "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
        tar -C "$rootfs" -c . | podman import - "$base" >/dev/null
        rm -rf "$rootfs"
    fi
    local context="$dir/standin"
    mkdir -p "$context"
    # Debian's Python in a venv on PATH, as python:3.12-slim has python and pip on PATH.
    cat >"$context/runtime.Containerfile" <<EOF
FROM $base
RUN printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\n' \\
        >/etc/dpkg/dpkg.cfg.d/slim \\
    && apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
        python3 python3-venv ca-certificates >/dev/null \\
    && apt-get clean && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/python
ENV PATH=/opt/python/bin:\$PATH
EOF
    cat >"$context/build.Containerfile" <<EOF
FROM localhost/wsgate-standin/python:runtime
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
        gcc libc6-dev python3-dev >/dev/null \\
    && apt-get clean && rm -rf /var/lib/apt/lists/*
EOF
    for stage in runtime build; do
        podman image exists "localhost/wsgate-standin/python:$stage" \
            || podman build "${build_flags[@]}" --quiet -t "localhost/wsgate-standin/python:$stage" \
                -f "$context/$stage.Containerfile" "$context" >/dev/null
    done
}

cmd_build() {
    need_tools
    use_dir "${1:-$(mktemp -d /tmp/wsgate-image.XXXXXX)}"
    echo "image.sh: podman storage in $dir" >&2
    build_bases
    local args=(
        --build-arg BUILD_IMAGE=localhost/wsgate-standin/python:build
        --build-arg RUNTIME_IMAGE=localhost/wsgate-standin/python:runtime
        --build-arg VERSION="$(version)"
        --build-arg REVISION="$(git -C "$repo" rev-parse HEAD 2>/dev/null || true)"
        --build-arg SOURCE="$(git -C "$repo" remote get-url origin 2>/dev/null || true)"
    )
    # pip in the build stage trusts what this machine trusts, and uses its index.
    local ca=/etc/ssl/certs/ca-certificates.crt
    [ -f "$ca" ] && args+=(--secret "id=ca,src=$ca")
    local index="${PIP_INDEX_URL:-}"
    case "$index" in http://* | https://*) args+=(--build-arg PIP_INDEX_URL="$index") ;; esac
    # The docker format keeps HEALTHCHECK, which the OCI format has no field for.
    podman build "${build_flags[@]}" --format docker "${args[@]}" -t "$(image_name)" "$repo" >"$dir/build.log" 2>&1 \
        || { tail -30 "$dir/build.log" >&2; exit 1; }
    echo "image.sh: built $(image_name); to run it: source $dir/env" >&2
    echo "$(image_name)"
}

compressed_size() {
    podman save "$1" 2>/dev/null | gzip -c | wc -c
}

cmd_size() {
    [ $# -eq 1 ] || usage
    made_by_build "$1"
    use_dir "$1"
    local image base
    image=$(compressed_size "$(image_name)")
    base=$(compressed_size localhost/wsgate-standin/python:runtime)
    echo "$(image_name): $image bytes compressed; its runtime base $base; wsgate's layers $((image - base))"
}

cmd_clean() {
    [ $# -eq 1 ] || usage
    made_by_build "$1"
    use_dir "$1"
    podman rm --all --force >/dev/null 2>&1 || true
    podman rmi --all --force >/dev/null 2>&1 || true
    # Overlay mounts left by a container that died with its podman.
    awk -v root="$dir/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r umount -l
    rm -rf "$dir"
}

cmd_test() {
    need_tools
    WSGATE_EXTRAS=test source "$repo/scripts/bootstrap.sh"
    exec "$repo/.venv/bin/python" -m pytest "$repo/tests/test_image.py" "$@"
}

case "${1:-}" in
    build) shift; cmd_build "$@" ;;
    test) shift; cmd_test "$@" ;;
    size) shift; cmd_size "$@" ;;
    clean) shift; cmd_clean "$@" ;;
    *) usage ;;
esac
