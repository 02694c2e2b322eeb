#!/bin/sh
# dracut mount hook: the root is mounted by the time the initqueue ends (streambootroot);
# a root that is not is said once, clearly.

[ "$root" = streamboot ] || return 0
ismounted "$NEWROOT" ||
    die "streamboot: the root was never mounted (no network, or the attach failed: see above)"
