#!/bin/sh
# dracut cmdline hook: root=streamboot selects the streamboot client. The network module
# brings the NIC up (ip=dhcp rd.neednet=1), then runs /sbin/streambootroot (netroot) to
# redeem the session, attach the disk and mount it at $NEWROOT.

[ -z "$root" ] && root=$(getarg root=)
[ "$root" = streamboot ] || return 0

. /lib/streamboot/client.sh
sb_parse_cmdline "$(cat /proc/cmdline)" || die "streamboot: $SB_ERROR"

# shellcheck disable=SC2034
rootok=1
netroot=streamboot
# The initqueue waits until the disk is attached (or its own timeout, then the shell).
echo '[ -e /run/streamboot/attached ]' > "$hookdir"/initqueue/finished/streamboot.sh
