#!/usr/bin/env bash
# The seed's manual recipe on the sandbox nodes, without kube-migros: run the demo workload in a pod
# on SOURCE, pause it, checkpoint it through the CRI, copy the archive to TARGET, restore it there
# through the CRI (the archive as the container image), and kill the source. It is the baseline the
# benchmarks compare kube-migros against, and a test that the node runtime can do a migration at all.
#
#   e2e/bench/raw-recipe.sh SOURCE TARGET IMAGE
#
# Needs the nodes up and the demo image pushed (`cargo run -p e2e -- node up`, `... node images`).
# Prints key=value lines: source_id, source_counter, archive_bytes, checkpoint_ms, copy_ms (cp on
# the host's disk), scp_ms (scp from the source node to the target node over the bridge),
# restore_ms, target_id, target_counter (the demo's id is random per process start, so equal ids
# mean the target runs the restored process). The source runs MIN_COUNTER ticks (10 ms each,
# default 200) before it is checkpointed; with TOUCH (e.g. 256Mi) it keeps that much memory written.
# KEEP_ARCHIVE=PATH keeps a copy of the checkpoint archive there. Pods use the node's network (the
# pod IP across nodes is the operator's business).
set -Eeuo pipefail
source_node=$1 target_node=$2 image=$3
state=${KUBE_MIGROS_STATE:-/var/lib/kube-migros-sandbox}/nodes
name="raw-$$"

source "$(dirname "$0")/nodes.sh"
ON_TIMEOUT=60
nodes_find "$source_node" "$target_node"
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
status() { on "$1" busybox nc -w 2 127.0.0.1 8080; }
field() { sed -n "s/.*\b$1=\([0-9a-f]*\).*/\1/p"; }

trap 'echo "raw-recipe: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
cleanup() { # remove this run's pods and sshd from both nodes, whatever happened
    if [ -n "${sshd_pid:-}" ]; then on "$target_node" kill "$sshd_pid" 2>/dev/null || true; fi
    for node in "$source_node" "$target_node"; do
        for p in $(on "$node" crictl pods -q --name "$name" 2>/dev/null); do
            on "$node" crictl stopp "$p" >/dev/null 2>&1 || true
            on "$node" crictl rmp -f "$p" >/dev/null 2>&1 || true
        done
        rm -rf "${state:?}/$node/containerd/$name"
    done
}
trap cleanup EXIT

for node in "$source_node" "$target_node"; do
    mkdir -p "$state/$node/containerd/$name"
    cat > "$state/$node/containerd/$name/pod.json" <<JSON
{"metadata": {"name": "$name", "namespace": "default", "uid": "$name", "attempt": 0},
 "log_directory": "/var/log/pods/$name",
 "linux": {"security_context": {"namespace_options": {"network": 2, "pid": 1}}}}
JSON
done
cat > "$state/$source_node/containerd/$name/app.json" <<JSON
{"metadata": {"name": "app"}, "image": {"image": "$image"},
 "args": ["serve", "--status", "127.0.0.1:8080", "--touch", "${TOUCH:-0}"], "log_path": "app.log",
 "linux": {"security_context": {"namespace_options": {"network": 2, "pid": 1}}}}
JSON
cat > "$state/$target_node/containerd/$name/app.json" <<JSON
{"metadata": {"name": "app"}, "image": {"image": "/var/lib/containerd/$name/checkpoint.tar"},
 "log_path": "app.log", "linux": {"security_context": {"namespace_options": {"network": 2, "pid": 1}}}}
JSON
dir=/var/lib/containerd/$name

pod=$(on "$source_node" crictl runp "$dir/pod.json" 2>/dev/null)
ctr=$(on "$source_node" crictl create --with-pull "$pod" "$dir/app.json" "$dir/pod.json" 2>/dev/null)
on "$source_node" crictl start "$ctr" >/dev/null 2>&1
min_counter=${MIN_COUNTER:-200}
until line=$(status "$source_node" 2>/dev/null) && [ "$(echo "$line" | field counter)" -ge "$min_counter" ] 2>/dev/null; do
    sleep 0.1
done

# Pause through containerd first (writing the freezer directly breaks the CRI checkpoint), then
# checkpoint: CRIU finds the cgroup frozen and leaves it so.
started=$(now_ms)
on "$source_node" ctr -n k8s.io tasks pause "$ctr"
on "$source_node" crictl checkpoint --export="$dir/checkpoint.tar" "$ctr" >/dev/null 2>&1
checkpointed=$(now_ms)
cp "$state/$source_node/containerd/$name/checkpoint.tar" "$state/$target_node/containerd/$name/checkpoint.tar"
copied=$(now_ms)
# The same archive with scp from the source node to the target node over the bridge (sshd on a
# spare port of the target, a fresh key, no host key checking: a measurement, not a deployment).
on "$source_node" ssh-keygen -q -t ed25519 -N "" -f "$dir/id" >/dev/null
mkdir -p "$state/$target_node/containerd/$name/ssh"
cp "$state/$source_node/containerd/$name/id.pub" "$state/$target_node/containerd/$name/ssh/authorized_keys"
on "$target_node" sh -c "ssh-keygen -A >/dev/null && mkdir -p /run/sshd"
target_ip=$(on "$target_node" ip -4 -o addr show cni0 | sed -n 's/.* inet \([0-9.]*\)\/.*/\1/p')
sshd_pid=$(on "$target_node" sh -c "/usr/sbin/sshd -p 2222 -o AuthorizedKeysFile=$dir/ssh/authorized_keys \
    -o StrictModes=no -o PermitRootLogin=prohibit-password -o PidFile=$dir/ssh/sshd.pid && sleep 0.2 && cat $dir/ssh/sshd.pid")
scp_started=$(now_ms)
on "$source_node" scp -q -i "$dir/id" -P 2222 -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
    "$dir/checkpoint.tar" "root@$target_ip:$dir/checkpoint-scp.tar" 2>/dev/null
scp_done=$(now_ms)
cmp "$state/$source_node/containerd/$name/checkpoint.tar" "$state/$target_node/containerd/$name/checkpoint-scp.tar"
restore_started=$(now_ms)
pod2=$(on "$target_node" crictl runp "$dir/pod.json" 2>/dev/null)
ctr2=$(on "$target_node" crictl create "$pod2" "$dir/app.json" "$dir/pod.json" 2>/dev/null)
on "$target_node" crictl start "$ctr2" >/dev/null 2>&1
restored=$(now_ms)
restore_ms=$(( restored - restore_started ))

# The source stays frozen until it is killed: a frozen task acts on SIGKILL once thawed, before
# running any code of its own.
on "$source_node" ctr -n k8s.io tasks kill -s SIGKILL "$ctr"
# (A task in a PID namespace of its own may be gone already: the kernel ends the namespace.)
on "$source_node" ctr -n k8s.io tasks resume "$ctr" 2>/dev/null || true
on "$source_node" crictl rm -f "$ctr" >/dev/null 2>&1 || true

if [ -n "${KEEP_ARCHIVE:-}" ]; then
    cp "$state/$target_node/containerd/$name/checkpoint.tar" "$KEEP_ARCHIVE"
fi
echo "source_id=$(echo "$line" | field id)"
echo "source_counter=$(echo "$line" | field counter)"
echo "archive_bytes=$(stat -c %s "$state/$target_node/containerd/$name/checkpoint.tar")"
echo "checkpoint_ms=$(( checkpointed - started ))"
echo "copy_ms=$(( copied - checkpointed ))"
echo "scp_ms=$(( scp_done - scp_started ))"
echo "restore_ms=$restore_ms"
until after=$(status "$target_node" 2>/dev/null) && [ -n "$after" ]; do sleep 0.1; done
echo "target_id=$(echo "$after" | field id)"
echo "target_counter=$(echo "$after" | field counter)"
