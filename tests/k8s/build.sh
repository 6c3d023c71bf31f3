#!/usr/bin/env bash
# Builds the server binaries of a real Kubernetes (kube-apiserver,
# kube-scheduler, kube-controller-manager, kubelet) from Debian bookworm's
# `kubernetes` source package with Debian's Go, and installs the node's
# runtime from Debian packages (etcd, containerd, runc, CNI plugins).
#
# The binaries are cached outside the clone, keyed by version, and built only
# when missing: 6 to 19 minutes on 2 cores the first time, nothing after
# (6 min 20 s alone on the machine, 18.5 min beside two busy fuzzers).
# Prints the directory holding the binaries on its last line.
set -euo pipefail

VERSION=1.20.2
DEB_VERSION=1.20.5+really1.20.2
CACHE=${BRIDGE_K8S_CACHE:-$HOME/.cache/bridge/k8s-$VERSION}
BIN=$CACHE/bin
BINARIES=(kube-apiserver kube-scheduler kube-controller-manager kubelet)

export DEBIAN_FRONTEND=noninteractive

# The node's runtime and the control plane's store: Debian packages.
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v gcc >/dev/null || need+=(gcc)
command -v conntrack >/dev/null || need+=(conntrack)
command -v iptables >/dev/null || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
    echo "k8s/build.sh: installing ${need[*]}" >&2
    # A temporary policy-rc.d keeps the packages from starting services
    # (containerd, etcd): the test cluster runs its own, on its own sockets.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
    if [ -n "$policy" ]; then
        rm -f "$policy"
        trap - EXIT
    fi
fi

have_all() {
    for b in "${BINARIES[@]}"; do [ -x "$BIN/$b" ] || return 1; done
}

if ! have_all; then
    echo "k8s/build.sh: building Kubernetes $VERSION from Debian's source package into $CACHE (6 to 19 minutes on 2 cores, once)" >&2
    src_list=/etc/apt/sources.list.d/bridge-k8s-src.sources
    if ! apt-get source --print-uris kubernetes >/dev/null 2>&1; then
        sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$src_list"
        apt-get update -qq
    fi
    command -v go >/dev/null && command -v rsync >/dev/null || \
        apt-get install -y -qq --no-install-recommends golang-go rsync >&2
    mkdir -p "$CACHE/src" "$BIN"
    cd "$CACHE/src"
    if [ ! -d "kubernetes-$VERSION" ]; then
        [ -f "kubernetes_$DEB_VERSION.orig.tar.gz" ] || apt-get source --download-only kubernetes >&2
        tar xzf "kubernetes_$DEB_VERSION.orig.tar.gz"
    fi
    cd "kubernetes-$VERSION"
    mkdir -p .go/src/k8s.io
    [ -e .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
    GOPATH=$PWD/.go CGO_ENABLED=0 GOPROXY=off \
        make WHAT='cmd/kube-apiserver cmd/kube-scheduler cmd/kube-controller-manager cmd/kubelet' >&2
    for b in "${BINARIES[@]}"; do
        install -m 0755 "_output/local/bin/linux/amd64/$b" "$BIN/$b"
    done
    # The pause container, from the same tree.
    gcc -Os -static -o "$BIN/pause" build/pause/linux/pause.c
    # The source tree (about 1 GiB with its build output) is not needed again.
    cd "$CACHE" && rm -rf "$CACHE/src"
fi
echo "$BIN"
