#!/bin/sh
# dracut initqueue/settled hook: attaches the disk once the network has an address, for
# network providers that run no netroot handler (systemd-networkd); with network-legacy
# and NetworkManager the handler (/sbin/streambootroot) gets there first. Each pass of the
# initqueue tries again until its timeout (rd.retry), then dracut's emergency shell.

[ "$root" = streamboot ] || return 0
[ -e /run/streamboot/attached ] && return 0
ip -4 -o addr show scope global 2> /dev/null | grep -q inet || return 0
/sbin/streambootroot
