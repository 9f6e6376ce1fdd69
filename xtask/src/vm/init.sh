#!/bin/busybox sh
# PID 1 of a test VM: mount what the tests use, load the modules, run every
# suite with the libtest harness, report through marker lines on the serial
# console, power off. xtask's qemu.rs parses the markers.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t bpf bpf /sys/fs/bpf
# For the cgroup socket hooks of process bindings.
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# PATH, LD_LIBRARY_PATH and the tests' settings.
. /vm/env
echo "MESH-VM kernel $(uname -r)"
for module in /vm/modules/*.ko; do
    insmod "$module" || echo "MESH-VM module-failed ${module##*/}"
done
ip link set lo up
for test in /vm/tests/*; do
    suite=${test##*/}
    # The suite's libtest arguments, as positional parameters.
    . "/vm/args/$suite"
    read -r start _ < /proc/uptime
    echo "MESH-VM suite-begin $suite"
    "$test" --test-threads=1 "$@" 2>&1
    status=$?
    read -r end _ < /proc/uptime
    echo "MESH-VM suite-end $suite $status $start $end"
done
echo "MESH-VM done"
poweroff -f
