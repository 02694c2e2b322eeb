#!/bin/sh
# Keeps the DHCP lease of the boot NIC's address for as long as the OS runs
# (streamboot-lease.service). The initramfs set that address without a DHCP client that
# stays (iPXE's lease, or klibc ipconfig's), so nothing else renews it: once it expired the
# DHCP server could give the address to another machine while the root is streamed to it.
#   lease.sh            runs busybox udhcpc on the NIC, this script as its event script
#   lease.sh EVENT      udhcpc's events: the interface is never changed, whatever they say
#                       (taking the address away would cut the machine off its root)
# Without a session from the initramfs-tools client (another boot, or dracut, whose
# distribution's network service holds the lease) it does nothing.

. "${SB_CORE:-/usr/lib/streamboot/client.sh}"

say() {
    echo "streamboot-lease: $*" >&2
}

case "${1:-run}" in
    run)
        sb_load_session && [ -n "$SB_IFACE" ] || exit 0
        _addr=$(ip -4 -o addr show dev "$SB_IFACE" 2> /dev/null | sed -n 's|.* inet \([0-9.]*\)/.*|\1|p' | head -n 1)
        if ! command -v busybox > /dev/null 2>&1; then
            say "no busybox: the DHCP lease of $SB_IFACE ${_addr:-} is not renewed"
            sb_notice lease-not-renewed "no busybox udhcpc in the image: the DHCP lease of ${_addr:-the boot NIC} is not renewed"
            exit 0
        fi
        # Asks for the address it has; retries every minute while no server answers.
        exec busybox udhcpc -f -i "$SB_IFACE" ${_addr:+-r "$_addr"} -s "$0" -t 3 -T 3 -A 60 \
            -x "hostname:$(hostname)"
        ;;
    bound | renew)
        _addr=$(ip -4 -o addr show dev "$interface" 2> /dev/null | sed -n 's|.* inet \([0-9.]*\)/.*|\1|p' | head -n 1)
        if [ -n "$_addr" ] && [ "$ip" != "$_addr" ]; then
            say "the DHCP server gives $interface $ip, but the root is streamed to $_addr: kept"
            sb_load_session && sb_notice lease-moved "the DHCP server gives $ip to this machine, which keeps $_addr (its root is streamed there)"
        else
            say "$1: $interface $ip for ${lease:-?} s"
        fi
        ;;
    deconfig) ;;
    leasefail | nak)
        say "$1 on $interface: the address stays (the root is streamed to it); asking again"
        ;;
esac
exit 0
