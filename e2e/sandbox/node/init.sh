#!/bin/sh
# The init of a sandbox node: PID 1 of a new PID namespace, in a new mount namespace, inside the
# node's network namespace (started by `e2e node up` through nsenter + unshare). It lays the node's
# root (the cached Debian rootfs as the lower layer of an overlay), pivots into it, and runs the
# node's daemons until it is killed, which ends the whole namespace with everything in it.
# Arguments: <rootfs> <node state dir> [<directory of the containerd to run, in the node>]
set -eu
lower=$1
state=$2
containerd_dir=${3:-}
mount --make-rprivate /
mkdir -p "$state/upper" "$state/work" "$state/root" "$state/containerd" "$state/host"
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$state/upper,workdir=$state/work" "$state/root"
cd "$state/root"
mount -t proc proc proc
mount --rbind /sys sys
mount --rbind /dev dev
mount -t tmpfs -o mode=0755 tmpfs run
mount -t tmpfs tmpfs tmp
# containerd's overlayfs snapshotter cannot work on an overlay: its data goes to a plain directory.
mkdir -p var/lib/containerd
mount --bind "$state/containerd" var/lib/containerd
# What the host hands the node: binaries (the agent, the migros-ipam CNI plugin), certificates.
mkdir -p opt/kube-migros
mount --bind "$state/host" opt/kube-migros
mkdir -p .old-root
pivot_root . .old-root
umount -l /.old-root
rmdir /.old-root
ip link set lo up
# The CNI plugin the node's network configuration names, once the host installs it.
ln -sf /opt/kube-migros/bin/migros-ipam /usr/lib/cni/migros-ipam
busybox hostname -F /etc/hostname
# containerd finds its runc shim on PATH: the one next to the chosen containerd comes first.
if [ -n "$containerd_dir" ]; then
    PATH="$containerd_dir:$PATH"
    export PATH
fi
exec containerd --config /etc/containerd/config.toml
