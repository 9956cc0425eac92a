# Sourced by the baseline scripts: commands in the sandbox's nodes from the host.
#
#   nodes_find NODE...   finds each node's containerd once (by its UTS hostname)
#   on NODE COMMAND...   runs COMMAND in the node's mount, PID, network, UTS and IPC namespaces

declare -A node_pids

nodes_find() {
    local node pid
    for node in "$@"; do
        for pid in $(ls /proc | grep -E '^[0-9]+$'); do
            if [ "$(cat /proc/$pid/comm 2>/dev/null)" = containerd ] \
                && [ "$(nsenter -t "$pid" -u hostname 2>/dev/null)" = "$node" ]; then
                node_pids[$node]=$pid
                break
            fi
        done
        [ -n "${node_pids[$node]:-}" ] || { echo "node $node is not running" >&2; exit 1; }
    done
}

on() {
    local node=$1; shift
    timeout "${ON_TIMEOUT:-120}" nsenter -t "${node_pids[$node]}" -m -p -n -u -i -- "$@"
}
