#!/bin/sh
# dracut netroot handler (/sbin/streambootroot NETIF NETROOT NEWROOT), run once the NIC is
# up: redeems the session's nonce and attaches its NBD disk.

command -v getarg > /dev/null || . /lib/dracut-lib.sh
. /lib/streamboot/client.sh

[ -e "$SB_RUN/attached" ] && exit 0
sb_parse_cmdline "$(cat /proc/cmdline)" || die "streamboot: $SB_ERROR"
sb_redeem || die "streamboot: $SB_ERROR"
sb_attach || die "streamboot: $SB_ERROR"
# What the mount hook needs (the answer's values replace the command line's).
for var in SB_SERVER SB_WC SB_PERSISTENCE SB_HOSTNAME SB_MACHINE_ID SB_SESSION_ID SB_ROOT_DEV SB_ROOT_TYPE; do
    eval "echo \"$var=\$$var\""
done > "$SB_RUN/attached.partial"
mv "$SB_RUN/attached.partial" "$SB_RUN/attached"
exit 0
