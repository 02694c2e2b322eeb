#!/bin/sh
# busybox udhcpc event script: configure the lease it got (address, route).
case "$1" in
    bound|renew)
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}"
        [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
        ;;
    deconfig)
        ip addr flush dev "$interface"
        ;;
esac
exit 0
