#!/bin/bash
# dracut module of the streamboot client (root=streamboot): the root filesystem comes from
# a streamboot server over NBD. The shell core is the one initramfs-tools uses too.

# called by dracut
check() {
    require_binaries nbd-client blkid || return 1
    # Only when asked for: /etc/dracut.conf.d/90-streamboot.conf adds it.
    return 255
}

# called by dracut
depends() {
    echo network
}

# called by dracut
installkernel() {
    instmods nbd overlay ext4
}

# called by dracut
install() {
    inst_multiple nbd-client blkid mount modprobe mkdir sleep tr head tail cat ls mv ip grep
    # Optional: the redeem request (curl, else nc), formatting a client-disk write cache,
    # bounded nbd-client attempts.
    inst_multiple -o curl nc mkfs.ext4 mke2fs timeout udevadm
    inst_simple "${STREAMBOOT_CORE:-/usr/lib/streamboot/client.sh}" /lib/streamboot/client.sh
    # The failover attach helper when installed (docs/failover.md).
    if [ -x /usr/lib/streamboot/streamboot-nbd ]; then
        inst_simple /usr/lib/streamboot/streamboot-nbd /sbin/streamboot-nbd
    fi
    inst_hook cmdline 90 "$moddir/parse-streamboot.sh"
    inst_script "$moddir/streambootroot.sh" /sbin/streambootroot
    inst_hook initqueue/settled 90 "$moddir/attach-streamboot.sh"
    inst_hook mount 90 "$moddir/mount-streamboot.sh"
    dracut_need_initqueue
}
