# streamboot hand-off: redeem the kernel-direct boot's nonce and attach the NBD export.
#
# The boot service's iPXE script put streamboot.server=URL and a one-time
# streamboot.nonce=NONCE on the kernel command line. This brings up the NIC with DHCP (the
# same address iPXE had: the nonce and the session answer that address only), trades the
# nonce for the session's export at URL/session/redeem, and attaches it as /dev/nbd0.
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

streamboot_redeem() {  # $1: the boot service's URL, $2: the nonce
    server=$1 nonce=$2
    iface=$(handoff_iface) || { say "no network interface"; return 1; }
    ip link set lo up
    ip link set "$iface" up
    udhcpc -i "$iface" -n -q -t 10 -T 1 -s /lib/streamboot/udhcpc.sh >/dev/null 2>&1 \
        || { say "DHCP on $iface failed"; return 1; }
    mac=$(cat "/sys/class/net/$iface/address")
    say "network $iface up ($(ip -4 -o addr show dev "$iface" | awk '{print $4}')), asking $server"
    # busybox wget shows no body on an error status, only the status line (403, 404, 410).
    answer=$(wget -O - "$server/session/redeem?nonce=$nonce" 2>/tmp/redeem.err) || {
        say "the boot server refused the nonce: $(grep -v '^Connecting' /tmp/redeem.err | tail -n 1)"
        return 1
    }
    nbd_host="" nbd_port="" export="" write_cache=""
    for line in $answer; do
        value=${line#*=}
        # Values are plain words (docs/boot.md); anything else is not used.
        case "$value" in *[!A-Za-z0-9._:/=,+-]*) continue ;; esac
        case "$line" in
            nbd_host=*) nbd_host=$value ;;
            nbd_port=*) nbd_port=$value ;;
            export=*) export=$value ;;
            write_cache=*) write_cache=$value ;;
        esac
    done
    [ -n "$nbd_host" ] && [ -n "$export" ] || { say "redeem answer incomplete: $answer"; return 1; }
    readonly_flag=""
    case "$write_cache" in client-*) readonly_flag="-readonly" ;; esac
    nbd-client "$nbd_host" "${nbd_port:-10809}" /dev/nbd0 -N "$export" -persist $readonly_flag \
        >/dev/null 2>&1 || { say "nbd-client could not attach $nbd_host:$nbd_port"; return 1; }
    export STREAMBOOT_WRITE_CACHE="$write_cache"
    say "attached nbd://$nbd_host:${nbd_port:-10809} as /dev/nbd0 (write cache $write_cache)"
}
