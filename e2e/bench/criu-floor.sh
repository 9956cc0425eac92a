#!/usr/bin/env bash
# The floor of a migration on the sandbox nodes: CRIU alone, no Kubernetes, no containerd, no
# archive. The demo workload runs as a plain process (in a PID namespace of its own) on SOURCE;
# CRIU dumps it into memory (the node's tmpfs), the images go to TARGET over the node-to-node TCP
# path (tar into a plain TCP connection and out of it, 1 MiB at a time: as raw as a copy gets),
# and CRIU restores them there from memory. Downtime is
# dump + transfer + restore: what kube-migros is compared with.
#
#   e2e/bench/criu-floor.sh SOURCE TARGET DEMO_BINARY
#
# DEMO_BINARY is the demo image's static binary on the host; TOUCH (e.g. 256Mi) is the memory the
# workload keeps written. Prints key=value lines: source_id, image_bytes, dump_ms, transfer_ms,
# restore_ms, target_id (equal ids: the target runs the restored process).
set -Eeuo pipefail
source_node=$1 target_node=$2 demo=$3
state=${KUBE_MIGROS_STATE:-/var/lib/kube-migros-sandbox}/nodes
port=18080 transfer_port=19000
images=/run/kube-migros-floor

source "$(dirname "$0")/nodes.sh"
nodes_find "$source_node" "$target_node"
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
status() { on "$1" busybox nc -w 2 127.0.0.1 "$port"; }
field() { sed -n "s/.*\b$1=\([0-9a-f]*\).*/\1/p"; }
node_ip() { on "$1" ip -4 -o addr show cni0 | sed -n 's/.* inet \([0-9.]*\)\/.*/\1/p'; }

trap 'echo "criu-floor: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
cleanup() { # the workload and the images on both nodes, whatever happened
    for node in "$source_node" "$target_node"; do
        on "$node" sh -c "pkill -KILL -f 'floor-demo serve' || true; rm -rf $images" 2>/dev/null || true
        rm -f "$state/$node/host/bin/floor-demo"
    done
}
trap cleanup EXIT
cleanup

for node in "$source_node" "$target_node"; do
    cp "$demo" "$state/$node/host/bin/floor-demo"
    on "$node" mkdir -p "$images"
done
# The workload: PID 1 of a PID namespace of its own (so that its PIDs are free on the target) and
# leader of its own session, stdio on /dev/null.
on "$source_node" unshare --pid --fork setsid /opt/kube-migros/bin/floor-demo serve \
    --status ":$port" --touch "${TOUCH:-0}" </dev/null >/dev/null 2>&1 &
for _ in $(seq 100); do
    counter=$(status "$source_node" 2>/dev/null | field counter || true)
    [ -n "$counter" ] && [ "$counter" -ge 100 ] && break
    sleep 0.1
done
source_id=$(status "$source_node" | field id)
pid=$(on "$source_node" pgrep -f -o 'floor-demo serve')
init=$(on "$source_node" pgrep -P "$pid" -f 'floor-demo serve' || echo "$pid")

start=$(now_ms)
on "$source_node" criu dump -t "$init" -D "$images" -o dump.log \
    || { on "$source_node" tail -20 "$images/dump.log" >&2; exit 1; }
dump_ms=$(( $(now_ms) - start ))
image_bytes=$(on "$source_node" du -sb "$images" | cut -f1)

target_ip=$(node_ip "$target_node")
# 1 MiB reads and writes at both ends (tar records, the receiver's reads), as the agents use.
on "$target_node" sh -c "perl -MIO::Socket::INET -e '
    my \$l = IO::Socket::INET->new(LocalPort => $transfer_port, Listen => 1, ReuseAddr => 1) or die;
    my \$c = \$l->accept; my \$b;
    while (sysread(\$c, \$b, 1 << 20)) { syswrite(STDOUT, \$b) == length(\$b) or die }
' | tar -x -b 2048 -C $images" &
receiver=$!
for _ in $(seq 100); do
    [ -n "$(on "$target_node" ss -Hltn "sport = :$transfer_port")" ] && break
    sleep 0.05
done
start=$(now_ms)
on "$source_node" bash -c "tar -c -b 2048 -C $images . > /dev/tcp/$target_ip/$transfer_port"
wait "$receiver"
transfer_ms=$(( $(now_ms) - start ))

start=$(now_ms)
on "$target_node" criu restore -D "$images" -o restore.log --restore-detached \
    || { on "$target_node" tail -20 "$images/restore.log" >&2; exit 1; }
restore_ms=$(( $(now_ms) - start ))
target_id=$(status "$target_node" | field id)

echo "source_id=$source_id"
echo "image_bytes=$image_bytes"
echo "dump_ms=$dump_ms"
echo "transfer_ms=$transfer_ms"
echo "restore_ms=$restore_ms"
echo "target_id=$target_id"
