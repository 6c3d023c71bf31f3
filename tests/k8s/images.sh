#!/usr/bin/env bash
# Builds the test cluster's images from Debian packages, once, into a cache
# outside the clone (keyed by the Debian release and what they hold):
#   pause.tar         registry.k8s.io/pause:3.6, the kubernetes tree's pause.c
#                     (built by build.sh), alone on an empty root
#   python.tar        bridge-test/python:3.11, a minimal Debian bookworm with
#                     python3 and venv (mmdebstrap), and the tests' stand-in
#                     for nvidia-smi (tests/fixtures/nvidia-smi), which the
#                     NVIDIA container runtime would put there on a GPU node
# Prints the directory holding them on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BIN=$("$here/build.sh" | tail -n 1)
key=$(cat "$here/images.sh" "$here/image.py" "$here/../fixtures/nvidia-smi" | sha256sum | cut -c1-12)
CACHE=${BRIDGE_K8S_IMAGES:-$HOME/.cache/bridge/k8s-images-$key}
mkdir -p "$CACHE"

if [ ! -f "$CACHE/pause.tar" ]; then
    tmp=$(mktemp -d)
    mkdir -p "$tmp/root"
    install -m 0755 "$BIN/pause" "$tmp/root/pause"
    tar -C "$tmp/root" -cf "$tmp/rootfs.tar" .
    python3 "$here/image.py" "$tmp/rootfs.tar" registry.k8s.io/pause:3.6 "$CACHE/pause.tar" /pause
    rm -rf "$tmp"
fi

if [ ! -f "$CACHE/python.tar" ]; then
    echo "k8s/images.sh: building bridge-test/python:3.11 from Debian bookworm packages (mmdebstrap)" >&2
    tmp=$(mktemp -d)
    mmdebstrap --quiet --variant=minbase --include=python3-minimal,python3-venv \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook="copy-in $here/../fixtures/nvidia-smi /usr/local/bin" \
        bookworm "$tmp/rootfs.tar" >&2
    python3 "$here/image.py" "$tmp/rootfs.tar" docker.io/bridge-test/python:3.11 "$CACHE/python.tar" /bin/sh
    rm -rf "$tmp"
fi
echo "$CACHE"
