#!/bin/sh
# dracut netroot handler (/sbin/streambootroot NETIF NETROOT NEWROOT), run once the NIC is
# up (also from the initqueue/settled hook): redeems the session's nonce, attaches its NBD
# disk and mounts the root at $NEWROOT by write-cache type. Mounting here, before the
# initqueue ends, makes systemd's sysroot.mount find /sysroot mounted already.

command -v getarg > /dev/null || . /lib/dracut-lib.sh
. /lib/streamboot/client.sh

# The operator sees why (a ClientNotice), the console too, then dracut's emergency shell.
stop() {
    sb_notice boot-failed "$SB_ERROR"
    die "streamboot: $SB_ERROR"
}

[ -e "$SB_RUN/attached" ] && exit 0
sb_parse_cmdline "$(cat /proc/cmdline)" || stop
sb_redeem || stop
sb_attach || stop
sb_mount_root "${NEWROOT:-/sysroot}" || stop
: > "$SB_RUN/attached"
exit 0
