# streamboot hand-off: switch from the firmware's HTTP SAN disk to the NBD export.
#
# Once the kernel runs, the firmware's INT13 SAN hook is gone and Linux sees no disk. This
# brings up the NIC with DHCP, asks the boot service's hand-off endpoint which NBD export
# belongs to this machine's live session, and attaches it as /dev/nbd0.
# Sourced by /init; needs busybox (ip, udhcpc, wget) and nbd-client in the initramfs.

handoff_iface() {
    for _ in $(seq 1 100); do
        for path in /sys/class/net/*; do
            name=${path##*/}
            [ "$name" = lo ] || { echo "$name"; return 0; }
        done
        sleep 0.1
    done
    return 1
}

streamboot_handoff() {  # $1: the hand-off URL, e.g. http://10.0.0.1:18082/handoff
    url=$1
    iface=$(handoff_iface) || { say "no network interface"; return 1; }
    ip link set lo up
    ip link set "$iface" up
    udhcpc -i "$iface" -n -q -t 10 -T 1 -s /lib/streamboot/udhcpc.sh >/dev/null 2>&1 \
        || { say "DHCP on $iface failed"; return 1; }
    mac=$(cat "/sys/class/net/$iface/address")
    say "network $iface up ($(ip -4 -o addr show dev "$iface" | awk '{print $4}')), asking $url"
    answer=$(wget -q -O - "$url?mac=$mac") || { say "hand-off endpoint refused mac $mac"; return 1; }
    nbd_host="" nbd_port="" export="" write_cache=""
    for line in $answer; do
        case "$line" in
            nbd_host=*|nbd_port=*|export=*|write_cache=*|traceparent=*) eval "$line" ;;
        esac
    done
    [ -n "$nbd_host" ] && [ -n "$export" ] || { say "hand-off answer incomplete: $answer"; return 1; }
    readonly_flag=""
    case "$write_cache" in client-*) readonly_flag="-readonly" ;; esac
    nbd-client "$nbd_host" "${nbd_port:-10809}" /dev/nbd0 -N "$export" -persist $readonly_flag \
        >/dev/null 2>&1 || { say "nbd-client could not attach $nbd_host:$nbd_port"; return 1; }
    export STREAMBOOT_WRITE_CACHE="$write_cache"
    say "attached nbd://$nbd_host:${nbd_port:-10809} as /dev/nbd0 (write cache $write_cache)"
}
