#!/bin/sh
# /init of the chimney guest initramfs (installed by chimney/images/_guest.py).
#
# Mounts the basics, loads the modules listed in /etc/chimney/modules, mounts
# the 9p shares 'chimney' (read-only, at /chimney) and 'results' (at /results),
# then runs the command QEMU passed as fw_cfg file opt/chimney/run with
# PYTHONPATH=/chimney, its stdout, stderr and exit status going byte-exact to
# /results/stdout, /results/stderr and /results/rc, and powers off.  Without
# a command it gives a shell on the serial console instead.
# Lines starting "chimney-init:" on the console mark its progress.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
TERM=linux
LANG=C.UTF-8
# Bytecode of the read-only /chimney share is cached in RAM (/run/pycache):
# without it every python3 recompiles ~30 modules, ~2 s under TCG.
export PATH HOME TERM LANG

up() { read -r t _ </proc/uptime; echo "$t"; }
log() { echo "chimney-init: $* (uptime $(up) s)"; }

poweroff_now() {
    sync
    echo o >/proc/sysrq-trigger
    sleep 10
    echo b >/proc/sysrq-trigger   # QEMU runs with -no-reboot: this exits too
    while :; do sleep 60; done
}

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/hugepages /run /tmp
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=000 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mount -t hugetlbfs -o mode=1770 hugetlbfs /dev/hugepages
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr
chmod 1777 /tmp
hostname chimney-guest
ip link set lo up
log "started"

if [ -s /etc/chimney/modules ]; then
    # shellcheck disable=SC2046
    modprobe -a $(cat /etc/chimney/modules) || log "warning: some modules failed to load"
fi
log "modules loaded"

mkdir -p /chimney /results
opts=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o "$opts,ro" chimney /chimney 2>/dev/null || log "no 'chimney' share"
mount -t 9p -o "$opts" results /results 2>/dev/null || log "no 'results' share"

RUN=/sys/firmware/qemu_fw_cfg/by_name/opt/chimney/run/raw
if [ -e "$RUN" ]; then
    cat "$RUN" >/run/chimney-run.sh
    mountpoint -q /results || log "error: /results is not mounted, results will be lost"
    cd /chimney 2>/dev/null || cd /
    log "running command"
    PYTHONPATH=/chimney PYTHONPYCACHEPREFIX=/run/pycache \
        /bin/sh /run/chimney-run.sh </dev/null >/results/stdout 2>/results/stderr
    rc=$?
    cd /
    echo "$rc" >/results/rc
    log "command exited with status $rc"
    sync
    umount /results 2>/dev/null
    poweroff_now
fi

if grep -qw 'chimney.agent=1' /proc/cmdline; then
    # Agent mode (chimney.host.vm): no udev, so name the virtio-serial ports
    # ourselves, then serve commands on /dev/virtio-ports/chimney.agent.  The
    # agent powers the guest off itself (request or ACPI power button).
    mkdir -p /dev/virtio-ports
    for p in /sys/class/virtio-ports/*; do
        [ -r "$p/name" ] && ln -sfn "/dev/${p##*/}" "/dev/virtio-ports/$(cat "$p/name")"
    done
    AGENT=/chimney/chimney/guest/agent.py
    while [ -r "$AGENT" ]; do
        log "starting the agent"
        (cd /chimney && PYTHONPATH=/chimney PYTHONPYCACHEPREFIX=/run/pycache python3 "$AGENT" </dev/null)
        log "agent exited with status $?, restarting"
        sleep 1
    done
    log "error: no agent at $AGENT"
fi

log "no command given (fw_cfg opt/chimney/run): shell on the console, exit it to power off"
tty=/dev/ttyS0
[ -c "$tty" ] || tty=/dev/console
cd /
PYTHONPATH=/chimney setsid -c /bin/bash -i <"$tty" >"$tty" 2>&1
poweroff_now
