#!/usr/bin/env bash
# A real one-node Kubernetes cluster on loopback, for the k8s provider's
# tests: etcd, kube-apiserver, kube-scheduler, kube-controller-manager and a
# kubelet with containerd, runc and the CNI bridge plugin (see
# ../shared/kubernetes.md for the facts behind each flag). Everything lives in
# DIR (state, sockets, logs, certificates) and listens on 127.0.0.1 ports
# chosen free at start; pods get addresses on a bridge of their own with no
# route or NAT to anything outside this machine.
#
#   cluster.sh DIR     starts it; prints `KUBECONFIG=DIR/admin.kubeconfig`
#                      and `ready` on stdout; stops everything when its stdin
#                      closes (the test harness holds it), or on SIGTERM.
#
# The node advertises 4 `nvidia.com/gpu` (a status patch: the scheduler
# counts them like a device plugin's). `DIR/apiserver.pid` holds the API
# server's pid: kill it and it is started again (port-forward cut tests).
# Users: `admin` (system:masters, admin.kubeconfig) and `alice` (no rights,
# alice.kubeconfig) for the RBAC refusals. Pods get service-account tokens
# and reach the API server at the `kubernetes` Service's address (10.0.0.1:443,
# what in-cluster clients dial): one nftables DNAT rule stands in for
# kube-proxy for that one Service; pods have a route to 10.0.0.0/24 only.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
DIR=$(realpath -m "${1:?usage: cluster.sh DIR}")
mkdir -p "$DIR"
BIN=$("$here/build.sh" | tail -n 1)
IMAGES=$("$here/images.sh" | tail -n 1)
NODE=bridge-node
log() { echo "k8s/cluster.sh: $*" >&2; }

pids=()
KUBELET_PID=
cleanup() {
    trap - EXIT TERM INT
    # The node first: no new containers; then the pods' containers, while
    # containerd still answers; then containerd, its shims and the rest.
    [ -n "$KUBELET_PID" ] && kill -KILL "$KUBELET_PID" 2>/dev/null
    if [ -S "$DIR/containerd.sock" ]; then
        for c in $(timeout 5 ctr -a "$DIR/containerd.sock" -n k8s.io tasks ls -q 2>/dev/null); do
            timeout 5 ctr -a "$DIR/containerd.sock" -n k8s.io tasks kill -s KILL "$c" >/dev/null 2>&1 || true
        done
    fi
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    pkill -KILL -f "containerd-shim-runc-v2 -namespace k8s.io -id [0-9a-f]* -address $DIR/containerd.sock" 2>/dev/null || true
    [ -f "$DIR/apiserver.pid" ] && kill -KILL "$(cat "$DIR/apiserver.pid")" 2>/dev/null
    sleep 0.3
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    # Mounts the kubelet and containerd left (volumes, sandboxes' /dev/shm).
    grep -o " $DIR/[^ ]*" /proc/self/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    ip link del bridgek8s0 2>/dev/null || true
    ip link del bridgek8snode 2>/dev/null || true
    iptables -t nat -D PREROUTING -i bridgek8s0 -j BRIDGEK8S 2>/dev/null || true
    iptables -t nat -F BRIDGEK8S 2>/dev/null || true
    iptables -t nat -X BRIDGEK8S 2>/dev/null || true
    [ "${BRIDGE_K8S_REMOVE:-}" = 1 ] && rm -rf "$DIR"
    return 0
}
trap cleanup EXIT TERM INT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ETCD_PORT=$(free_port); ETCD_PEER=$(free_port); API_PORT=$(free_port)
KUBELET_PORT=$(free_port)

# --- certificates and tokens -------------------------------------------------
PKI=$DIR/pki
mkdir -p "$PKI"
if [ ! -f "$PKI/ca.crt" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=bridge-test-ca \
        -keyout "$PKI/ca.key" -out "$PKI/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver \
        -keyout "$PKI/apiserver.key" -out "$PKI/apiserver.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\n' >"$PKI/san.ext"
    openssl x509 -req -in "$PKI/apiserver.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
        -CAcreateserial -days 3650 -extfile "$PKI/san.ext" -out "$PKI/apiserver.crt" 2>/dev/null
    openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
    openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
    ADMIN_TOKEN=$(openssl rand -hex 16); ALICE_TOKEN=$(openssl rand -hex 16)
    printf '%s,admin,1,"system:masters"\n%s,alice,2\n' "$ADMIN_TOKEN" "$ALICE_TOKEN" >"$PKI/tokens.csv"
    chmod 600 "$PKI"/*.key "$PKI/tokens.csv"
fi
ADMIN_TOKEN=$(sed -n 1p "$PKI/tokens.csv" | cut -d, -f1)
ALICE_TOKEN=$(sed -n 2p "$PKI/tokens.csv" | cut -d, -f1)

kubeconfig() { # FILE USER TOKEN
    cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: bridge-test
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $2
  user:
    token: $3
contexts:
- name: $2@bridge-test
  context: {cluster: bridge-test, user: $2, namespace: default}
current-context: $2@bridge-test
KC
    chmod 600 "$1"
}
kubeconfig "$DIR/admin.kubeconfig" admin "$ADMIN_TOKEN"
kubeconfig "$DIR/alice.kubeconfig" alice "$ALICE_TOKEN"
KC=$DIR/admin.kubeconfig

# --- control plane -----------------------------------------------------------
etcd --name bridge-test --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
    --initial-cluster "bridge-test=http://127.0.0.1:$ETCD_PEER" \
    >"$DIR/etcd.log" 2>&1 &
pids+=($!)

# The API server, restarted whenever it exits (a test kills it to cut
# port-forwards).
(
    while true; do
        "$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
            --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
            --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
            --client-ca-file="$PKI/ca.crt" --token-auth-file="$PKI/tokens.csv" \
            --authorization-mode=Node,RBAC --allow-privileged=true \
            --service-account-issuer=https://kubernetes.default.svc \
            --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
            --service-cluster-ip-range=10.0.0.0/24 \
            --kubelet-preferred-address-types=InternalIP --endpoint-reconciler-type=none \
            >>"$DIR/apiserver.log" 2>&1 &
        echo $! >"$DIR/apiserver.pid"
        wait $! || true
        sleep 0.3
    done
) &
pids+=($!)

kc() { kubectl --kubeconfig "$KC" --request-timeout=5s "$@"; }
for _ in $(seq 600); do
    kc get --raw /readyz >/dev/null 2>&1 && break
    sleep 0.2
done
kc get --raw /readyz >/dev/null || { log "the API server did not become ready: $(tail -5 "$DIR/apiserver.log")"; exit 1; }

"$BIN/kube-scheduler" --kubeconfig="$KC" --leader-elect=false --port=0 --secure-port=0 \
    >"$DIR/scheduler.log" 2>&1 &
pids+=($!)
"$BIN/kube-controller-manager" --kubeconfig="$KC" --leader-elect=false --port=0 --secure-port=0 \
    --use-service-account-credentials=false \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    >"$DIR/controller-manager.log" 2>&1 &
pids+=($!)

# --- the node: containerd + kubelet ------------------------------------------
mkdir -p "$DIR/cni" "$DIR/containerd" "$DIR/certs.d/docker.io"
# No registry is reachable (and none may be tried): every pull goes to a
# closed loopback port and fails at once.
printf 'server = "http://127.0.0.1:9"\n[host."http://127.0.0.1:9"]\n  capabilities = ["pull", "resolve"]\n' \
    >"$DIR/certs.d/docker.io/hosts.toml"
mkdir -p "$DIR/certs.d/registry.k8s.io" && cp "$DIR/certs.d/docker.io/hosts.toml" "$DIR/certs.d/registry.k8s.io/"
cat >"$DIR/cni/10-bridge.conflist" <<CNI
{
  "cniVersion": "0.4.0",
  "name": "bridge-test",
  "plugins": [{
    "type": "bridge", "bridge": "bridgek8s0", "isGateway": true, "ipMasq": false,
    "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.7.0/24"}]],
             "routes": [{"dst": "10.0.0.0/24"}], "dataDir": "$DIR/cni-ipam"}
  }, {"type": "loopback"}]
}
CNI
cat >"$DIR/containerd.toml" <<CT
version = 2
root = "$DIR/containerd/root"
state = "$DIR/containerd/state"
[grpc]
  address = "$DIR/containerd.sock"
[ttrpc]
  address = "$DIR/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.6"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$DIR/cni"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$DIR/certs.d"
CT
containerd --config "$DIR/containerd.toml" >"$DIR/containerd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$DIR/containerd.sock" ] && break; sleep 0.1; done
for img in pause python; do
    ctr -a "$DIR/containerd.sock" -n k8s.io images import --no-unpack=false "$IMAGES/$img.tar" >/dev/null
done

# The node's address: on a veth interface of this machine (the kubelet
# will not take a loopback one, and the machine's own may face a network).
NODE_IP=10.244.6.1
ip link del bridgek8snode 2>/dev/null || true
ip link add bridgek8snode type veth peer name bridgek8snodep
ip link set bridgek8snodep up
ip addr add $NODE_IP/32 dev bridgek8snode
ip link set bridgek8snode up

# The pods' bridge, made before the CNI plugin takes it, so that the API
# server on 127.0.0.1 can be reached from it (route_localnet), and the one
# Service pods dial: the API server's.
ip link del bridgek8s0 2>/dev/null || true
ip link add bridgek8s0 type bridge
ip link set bridgek8s0 up
echo 1 >/proc/sys/net/ipv4/conf/bridgek8s0/route_localnet
iptables -t nat -D PREROUTING -i bridgek8s0 -j BRIDGEK8S 2>/dev/null || true
iptables -t nat -F BRIDGEK8S 2>/dev/null || iptables -t nat -N BRIDGEK8S
iptables -t nat -A BRIDGEK8S -d 10.0.0.1/32 -p tcp --dport 443 -j DNAT --to-destination "127.0.0.1:$API_PORT"
iptables -t nat -A PREROUTING -i bridgek8s0 -j BRIDGEK8S

mkdir -p "$DIR/kubelet"
"$BIN/kubelet" --kubeconfig="$KC" --container-runtime=remote \
    --container-runtime-endpoint="unix://$DIR/containerd.sock" --image-service-endpoint="unix://$DIR/containerd.sock" \
    --root-dir="$DIR/kubelet" --cert-dir="$DIR/kubelet/pki" --hostname-override=$NODE \
 --node-ip=$NODE_IP \
    --address=$NODE_IP --port="$KUBELET_PORT" --read-only-port=0 --healthz-port=0 \
    --fail-swap-on=false --cgroup-driver=cgroupfs --cgroups-per-qos=false --enforce-node-allocatable= \
    --eviction-hard='memory.available<1Mi,nodefs.available<1%,imagefs.available<1%' \
    --image-gc-high-threshold=100 --image-gc-low-threshold=99 \
    --volume-plugin-dir="$DIR/kubelet/plugins" --resolv-conf= \
    --node-status-update-frequency=4s --sync-frequency=5s \
    >"$DIR/kubelet.log" 2>&1 &
KUBELET_PID=$!

for _ in $(seq 300); do kc get node $NODE >/dev/null 2>&1 && break; sleep 0.2; done
kc get node $NODE >/dev/null || { log "the kubelet did not register: $(tail -5 "$DIR/kubelet.log")"; exit 1; }
# 4 GPUs, as a device plugin would advertise them.
patch='{"status":{"capacity":{"nvidia.com/gpu":"4"},"allocatable":{"nvidia.com/gpu":"4"}}}'
kc patch node $NODE --subresource=status --type=merge -p "$patch" >/dev/null 2>&1 || \
    curl -sf --cacert "$PKI/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" -H 'Content-Type: application/merge-patch+json' \
        -X PATCH --data "$patch" "https://127.0.0.1:$API_PORT/api/v1/nodes/$NODE/status" >/dev/null
for _ in $(seq 300); do
    [ "$(kc get node $NODE -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ] && break
    sleep 0.2
done
[ "$(kc get node $NODE -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ] || {
    log "the node is not Ready: $(tail -5 "$DIR/kubelet.log")"; exit 1; }
kc create namespace forbidden >/dev/null 2>&1 || true
# The default namespace's service account and its token exist before any pod
# asks (the admission plugin refuses pods until then).
for _ in $(seq 300); do
    [ -n "$(kc get serviceaccount default -o jsonpath='{.secrets[0].name}' 2>/dev/null)" ] && break
    sleep 0.2
done

echo "KUBECONFIG=$KC"
echo "ready"
# Until the harness closes our stdin.
while read -r _; do :; done
