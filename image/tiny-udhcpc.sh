#!/bin/sh
# udhcpc's event script in the tiny lab image (image/tiny-init.sh starts udhcpc with it).
# What the DHCP server sent arrives in environment variables; it is used only as quoted
# arguments and checked with `case`, never evaluated.
set -u
valid() { case "$1" in ''|*[!A-Za-z0-9_.-]*) return 1 ;; esac; }

case "$1" in
    deconfig)
        ifconfig "$interface" 0.0.0.0 up
        ;;
    bound|renew)
        valid "${ip-}" || exit 1
        if valid "${subnet-}"; then
            ifconfig "$interface" "$ip" netmask "$subnet" up
        else
            ifconfig "$interface" "$ip" up
        fi
        set -f
        for gateway in ${router-}; do
            valid "$gateway" || continue
            while route del default dev "$interface" 2>/dev/null; do :; done
            route add default gw "$gateway" dev "$interface"
            break
        done
        # A name given on the kernel command line wins over the server's.
        if [ ! -s /run/vlx-hostname ] && valid "${hostname-}"; then
            echo "$hostname" > /run/vlx-hostname
        fi
        # Name servers and search list (a VM's VC domain): short names resolve.
        names=""
        for name in ${search-}; do
            valid "$name" && names="$names $name"
        done
        [ -n "$names" ] || ! valid "${domain-}" || names=" $domain"
        {
            for server in ${dns-}; do
                valid "$server" && echo "nameserver $server"
            done
            [ -z "$names" ] || echo "search$names"
        } > /etc/resolv.conf
        echo "$ip" > /run/vlx-ip
        ;;
esac
exit 0
