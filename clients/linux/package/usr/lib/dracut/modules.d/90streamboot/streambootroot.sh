#!/bin/sh
# dracut netroot handler (/sbin/streambootroot NETIF NETROOT NEWROOT), run once the NIC is
# up (also from the initqueue/settled hook): redeems the session's nonce, attaches its NBD
# disk and mounts the root at $NEWROOT by write-cache type. Mounting here, before the
# initqueue ends, makes systemd's sysroot.mount find /sysroot mounted already.

command -v getarg > /dev/null || . /lib/dracut-lib.sh
. /lib/streamboot/client.sh

[ -e "$SB_RUN/attached" ] && exit 0
sb_parse_cmdline "$(cat /proc/cmdline)" || die "streamboot: $SB_ERROR"
sb_redeem || die "streamboot: $SB_ERROR"
sb_attach || die "streamboot: $SB_ERROR"
sb_mount_root "${NEWROOT:-/sysroot}" || die "streamboot: $SB_ERROR"
: > "$SB_RUN/attached"
exit 0
