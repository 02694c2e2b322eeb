#!/bin/sh
# dracut mount hook: mounts the attached streamboot root at $NEWROOT by write-cache type.

[ "$root" = streamboot ] || return 0
. /lib/streamboot/client.sh
[ -e "$SB_RUN/attached" ] || die "streamboot: the disk was never attached (no network, or the netroot handler failed: see above)"
# Values written by streambootroot, all checked by the core before (sb_valid charset).
. "$SB_RUN/attached"
sb_mount_root "$NEWROOT" || die "streamboot: $SB_ERROR"
