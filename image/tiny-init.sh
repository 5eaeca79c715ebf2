#!/bin/sh
# /init of the tiny lab image (image/tiny.py): mount the kernel's file systems, load the virtio
# modules, bring eth0 up from the kernel's `ip=` or by DHCP, print one line
#     virtualinux: node NAME up IP
# on the console, then keep a shell on the console forever.
#
# Values from the kernel command line and from DHCP are data, never code: they are split with
# IFS and matched with `case`, never passed to eval or a second shell.
#
# No `set -e`: this is PID 1, and if it exits the kernel panics; every failure is reported on
# the console instead and the image carries on to the shell, where one can look.
set -u
PATH=/bin:/sbin
export PATH

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp
mount -t devpts devpts /dev/pts

# The load order was worked out at build time from the modules' own dependencies.
while read -r module; do
    insmod "/lib/modules/$module.ko" || echo "virtualinux: insmod $module failed"
done < /lib/modules/load-order

# --- the kernel command line: ip=CLIENT:SERVER:GW:MASK:HOSTNAME:DEVICE:AUTOCONF, vlx.hostname=
set -f                      # split words without expanding globs
ip_arg=""
name=""
read -r cmdline < /proc/cmdline
for word in $cmdline; do
    case "$word" in
        ip=*) ip_arg=${word#ip=} ;;
        vlx.hostname=*) name=${word#vlx.hostname=} ;;
    esac
done

# Anything outside these characters is not an address, a host name or an interface name.
valid_name() { case "$1" in ''|*[!A-Za-z0-9_.-]*) return 1 ;; esac; }
valid_ipv4() { case "$1" in ''|*[!0-9.]*) return 1 ;; esac; }
if [ -n "$name" ] && ! valid_name "$name"; then
    echo "virtualinux: ignoring a bad vlx.hostname"
    name=""
fi

addr=""; gw=""; mask=""; dev=""
case "$ip_arg" in
    *:*)
        old_ifs=$IFS
        IFS=:
        set -- $ip_arg
        IFS=$old_ifs
        addr=${1-}; gw=${3-}; mask=${4-}
        [ -n "$name" ] || name=${5-}
        dev=${6-}
        ;;
esac

valid_name "$dev" || dev=eth0
if [ -n "$name" ] && ! valid_name "$name"; then
    echo "virtualinux: ignoring a bad host name in ip="
    name=""
fi
valid_ipv4 "$addr" || addr=""
valid_ipv4 "$gw" || gw=""
valid_ipv4 "$mask" || mask=""

# virtio_net registers the device asynchronously: wait a little for it.
tries=0
while [ ! -e "/sys/class/net/$dev" ] && [ "$tries" -lt 50 ]; do
    sleep 0.1
    tries=$((tries + 1))
done
ip link set lo up

if [ -n "$addr" ]; then
    if [ -n "$mask" ]; then
        ifconfig "$dev" "$addr" netmask "$mask" up || addr=""
    else
        ifconfig "$dev" "$addr" up || addr=""
    fi
    [ -z "$addr" ] || [ -z "$gw" ] || route add default gw "$gw" "$dev"
else
    # udhcpc keeps running to renew the lease; its script writes what it was given to /run.
    [ -z "$name" ] || echo "$name" > /run/vlx-hostname
    udhcpc -f -S -i "$dev" -s /etc/udhcpc.script -A 2 > /run/udhcpc.log 2>&1 &
    tries=0
    while [ ! -s /run/vlx-ip ] && [ "$tries" -lt 600 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    [ ! -s /run/vlx-ip ] || read -r addr < /run/vlx-ip
    [ ! -s /run/vlx-hostname ] || read -r name < /run/vlx-hostname
fi

[ -n "$name" ] || name=unnamed
hostname "$name"
if [ -n "$addr" ]; then
    printf 'virtualinux: node %s up %s\n' "$name" "$addr"
else
    printf 'virtualinux: node %s has no address on %s\n' "$name" "$dev"
fi

# A shell on the console, again whenever it exits. `poweroff -f` stops the machine.
while :; do
    setsid cttyhack sh
    sleep 1
done
