# streamboot client core: attaches the root filesystem streamed by a streamboot server.
#
# Sourced (POSIX sh: busybox ash, dash, bash) by the initramfs-tools script
# (/scripts/streamboot, boot=streamboot) and by the dracut module (90streamboot,
# root=streamboot); both bring the network up themselves, then call
#   sb_parse_cmdline "$(cat /proc/cmdline)" && sb_attach && sb_mount_root TARGET
# Every function returns non-zero on failure with the reason in SB_ERROR (one line, which
# the caller prints as "streamboot: $SB_ERROR" before it stops); nothing waits unbounded.
#
# Kernel command line (written by the boot service's kernel-direct iPXE script):
#   streamboot.server=http://HOST:PORT streamboot.nonce=NONCE streamboot.root=UUID=...|
#   PARTUUID=...|whole streamboot.wc=server-ram|server-disk|client-ram|client-disk
#   systemd.hostname=NAME systemd.machine_id=HEX32
#   streamboot.ip=ADDRESS:GATEWAY:NETMASK BOOTIF=01-aa-bb-cc-dd-ee-ff (what iPXE's DHCP got)
# The nonce is redeemed once at GET SERVER/session/redeem?nonce=NONCE, whose text/plain
# answer (key=value lines) names the NBD export and the session's identity.

SB_RUN=${SB_RUN:-/run/streamboot}
SB_NBD=${SB_NBD:-/dev/nbd0}
SB_WC_LABEL=streamboot-wc
SB_ERROR=
# A carriage return, made once: every fork is slow on a booting machine (and under emulation).
SB_CR=$(printf '\r')

sb_fail() {
    SB_ERROR="$*"
    return 1
}

# A progress line on the console (stderr when there is no console, as in tests).
sb_say() {
    if [ -w "${SB_CONSOLE:-/dev/console}" ]; then
        echo "streamboot: $*" > "${SB_CONSOLE:-/dev/console}"
    else
        echo "streamboot: $*" >&2
    fi
}

# True when $1 is non-empty and uses only the characters the contract allows in values.
sb_valid() {
    case "$1" in
        '' | *[!A-Za-z0-9._:/=,+-]*) return 1 ;;
    esac
    return 0
}

# nbd_nodes= also has the brackets of IPv6 endpoints ("[fd00::2]:10809").
sb_valid_nodes() {
    case "$1" in
        '' | *[!]A-Za-z0-9._:,[-]*) return 1 ;;
    esac
    return 0
}

sb_check_wc() {
    case "$1" in
        server-ram | server-disk | client-ram | client-disk) return 0 ;;
    esac
    return 1
}

sb_check_hostname() {
    case "$1" in
        '' | *[!A-Za-z0-9.-]* | -* | .*) return 1 ;;
    esac
    [ "${#1}" -le 64 ]
}

# True when $1 is a dotted IPv4 address.
sb_check_ipv4() {
    case "$1" in
        '' | *[!0-9.]* | .* | *. | *..*) return 1 ;;
    esac
    _sb_ifs=$IFS
    IFS=.
    # shellcheck disable=SC2086
    set -- $1
    IFS=$_sb_ifs
    [ "$#" -eq 4 ] || return 1
    for _sb_octet in "$@"; do
        [ "${#_sb_octet}" -le 3 ] && [ "$_sb_octet" -le 255 ] || return 1
    done
}

# The address iPXE's DHCP got, "ADDRESS:GATEWAY:NETMASK" (gateway and netmask may be
# empty); true when it is one.
sb_check_static() {
    case "$1" in *:*:*) ;; *) return 1 ;; esac
    _sb_addr=${1%%:*}
    _sb_rest=${1#*:}
    _sb_gw=${_sb_rest%%:*}
    _sb_mask=${_sb_rest#*:}
    case "$_sb_mask" in *:*) return 1 ;; esac
    sb_check_ipv4 "$_sb_addr" || return 1
    [ -z "$_sb_gw" ] || sb_check_ipv4 "$_sb_gw" || return 1
    [ -z "$_sb_mask" ] || sb_check_ipv4 "$_sb_mask"
}

# The kernel's ip= form of the static address $1 (sb_check_static's), its interface left
# empty for the initramfs to fill in: ADDRESS::GATEWAY:NETMASK:::off.
sb_ip_param() {
    _sb_rest=${1#*:}
    echo "${1%%:*}::${_sb_rest%%:*}:${_sb_rest#*:}:::off"
}

# The MAC address of a BOOTIF=01-aa-bb-cc-dd-ee-ff value, as aa:bb:cc:dd:ee:ff.
sb_bootif_mac() {
    case "$1" in
        01-[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f]-[0-9a-f][0-9a-f])
            echo "${1#01-}" | tr - : ;;
        *) return 1 ;;
    esac
}

sb_check_mac() {
    case "$1" in
        [0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]) return 0 ;;
    esac
    return 1
}

# True when $1 is a network interface's name (at most 15 characters, no path or spaces).
sb_check_iface() {
    case "$1" in
        '' | *[!A-Za-z0-9._-]* | .*) return 1 ;;
    esac
    [ "${#1}" -le 15 ]
}

sb_check_machine_id() {
    case "$1" in
        *[!0-9a-f]*) return 1 ;;
    esac
    [ "${#1}" -eq 32 ]
}

# Reads the streamboot.* arguments of the command line $1 into SB_SERVER, SB_NONCE,
# SB_ROOT, SB_WC (and SB_HOSTNAME, SB_MACHINE_ID from systemd.hostname/machine_id; SB_STATIC,
# the address iPXE got, and SB_MAC from BOOTIF=, both empty when absent or malformed).
# One pass in this shell (the last word wins, as in the kernel): no subshell per argument.
sb_parse_cmdline() {
    SB_SERVER= SB_NONCE= SB_ROOT=whole SB_WC=server-disk SB_HOSTNAME= SB_MACHINE_ID=
    SB_STATIC= SB_MAC= _sb_bootif=
    _sb_has=
    set -f
    for _sb_word in $1; do
        case "$_sb_word" in
            streamboot.server=*) SB_SERVER=${_sb_word#*=}; _sb_has="$_sb_has server" ;;
            streamboot.nonce=*) SB_NONCE=${_sb_word#*=}; _sb_has="$_sb_has nonce" ;;
            streamboot.root=*) SB_ROOT=${_sb_word#*=} ;;
            streamboot.wc=*) SB_WC=${_sb_word#*=} ;;
            streamboot.ip=*) SB_STATIC=${_sb_word#*=} ;;
            systemd.hostname=*) SB_HOSTNAME=${_sb_word#*=} ;;
            systemd.machine_id=*) SB_MACHINE_ID=${_sb_word#*=} ;;
            BOOTIF=*) _sb_bootif=${_sb_word#*=} ;;
        esac
    done
    set +f
    case "$_sb_has" in *" server"*) ;; *)
        sb_fail "no streamboot.server= on the kernel command line (boot through the streamboot server's kernel-direct script)"
        return 1 ;;
    esac
    case "$SB_SERVER" in
        http://*) sb_valid "$SB_SERVER" || sb_fail "streamboot.server= has characters outside [A-Za-z0-9._:/=,+-]" || return 1 ;;
        *) sb_fail "streamboot.server= must be an http:// URL, not '$SB_SERVER'"; return 1 ;;
    esac
    case "$_sb_has" in *" nonce"*) ;; *)
        sb_fail "no streamboot.nonce= on the kernel command line (each boot needs a fresh one from the server's iPXE script)"
        return 1 ;;
    esac
    case "$SB_NONCE" in
        *[!A-Za-z0-9_-]*) sb_fail "streamboot.nonce= is malformed"; return 1 ;;
    esac
    if [ "${#SB_NONCE}" -lt 16 ] || [ "${#SB_NONCE}" -gt 64 ]; then
        sb_fail "streamboot.nonce= is malformed (16 to 64 characters)"; return 1
    fi
    case "$SB_ROOT" in
        whole) ;;
        UUID=?* | PARTUUID=?*) sb_valid "$SB_ROOT" || sb_fail "streamboot.root= is malformed" || return 1 ;;
        *) sb_fail "streamboot.root= must be UUID=..., PARTUUID=... or whole, not '$SB_ROOT'"; return 1 ;;
    esac
    sb_check_wc "$SB_WC" || sb_fail "streamboot.wc= '$SB_WC' is not a write-cache type" || return 1
    # Only an optimisation (no second DHCP): a malformed one means DHCP as without it.
    sb_check_static "$SB_STATIC" || SB_STATIC=
    SB_MAC=$(sb_bootif_mac "$_sb_bootif") || SB_MAC=
    return 0
}

# Reads the redeem answer (key=value lines) from file $1; its values replace the command
# line's. Unknown keys are ignored (a newer server); a missing or malformed one fails.
sb_parse_answer() {
    SB_NBD_HOST= SB_NBD_PORT= SB_EXPORT= SB_PERSISTENCE= SB_SESSION_ID= SB_TRACEPARENT=
    SB_NBD_NODES=
    _sb_lines=0
    while IFS= read -r _sb_line || [ -n "$_sb_line" ]; do
        _sb_lines=$((_sb_lines + 1))
        [ "$_sb_lines" -le 64 ] || { sb_fail "the server's answer is too long"; return 1; }
        _sb_line=${_sb_line%"$SB_CR"}
        [ -n "$_sb_line" ] || continue
        case "$_sb_line" in
            *=*) ;;
            *) sb_fail "the server's answer has a line that is not key=value"; return 1 ;;
        esac
        _sb_key=${_sb_line%%=*}
        _sb_val=${_sb_line#*=}
        case "$_sb_key" in
            nbd_nodes) sb_valid_nodes "$_sb_val" ;;
            *) sb_valid "$_sb_val" ;;
        esac || { sb_fail "the server's answer has a malformed $_sb_key="; return 1; }
        case "$_sb_key" in
            nbd_host) SB_NBD_HOST=$_sb_val ;;
            nbd_port) SB_NBD_PORT=$_sb_val ;;
            nbd_nodes) SB_NBD_NODES=$_sb_val ;;
            export) SB_EXPORT=$_sb_val ;;
            write_cache) SB_WC=$_sb_val ;;
            persistence) SB_PERSISTENCE=$_sb_val ;;
            hostname) SB_HOSTNAME=$_sb_val ;;
            machine_id) SB_MACHINE_ID=$_sb_val ;;
            session_id) SB_SESSION_ID=$_sb_val ;;
            traceparent) SB_TRACEPARENT=$_sb_val ;;
            mac) sb_check_mac "$_sb_val" && SB_MAC=$_sb_val ;;
        esac
    done < "$1"
    for _sb_need in nbd_host:"$SB_NBD_HOST" nbd_port:"$SB_NBD_PORT" export:"$SB_EXPORT"; do
        [ -n "${_sb_need#*:}" ] || { sb_fail "the server's answer has no ${_sb_need%%:*}="; return 1; }
    done
    case "$SB_NBD_PORT" in
        *[!0-9]*) sb_fail "the server's answer has a malformed nbd_port="; return 1 ;;
    esac
    [ "$SB_NBD_PORT" -ge 1 ] && [ "$SB_NBD_PORT" -le 65535 ] ||
        sb_fail "the server's answer has a malformed nbd_port=" || return 1
    sb_check_wc "$SB_WC" || sb_fail "the server's answer has an unknown write_cache=$SB_WC" || return 1
    case "${SB_PERSISTENCE:=discard}" in
        discard | keep) ;;
        *) sb_fail "the server's answer has an unknown persistence=$SB_PERSISTENCE"; return 1 ;;
    esac
    [ -z "$SB_HOSTNAME" ] || sb_check_hostname "$SB_HOSTNAME" ||
        sb_fail "the hostname '$SB_HOSTNAME' is not a valid hostname" || return 1
    [ -z "$SB_MACHINE_ID" ] || sb_check_machine_id "$SB_MACHINE_ID" ||
        sb_fail "the machine-id '$SB_MACHINE_ID' is not 32 lowercase hex digits" || return 1
    return 0
}

# HOST and PORT of an http:// URL: "HOST PORT" (port 80 when absent).
sb_url_hostport() {
    _sb_rest=${1#http://}
    _sb_rest=${_sb_rest%%/*}
    case "$_sb_rest" in
        *:*) echo "${_sb_rest%:*} ${_sb_rest##*:}" ;;
        *) echo "$_sb_rest 80" ;;
    esac
}

# GET $1 into file $2 within $3 seconds (10 when absent); prints the HTTP status (000: no
# answer). curl when the system has it, else a raw HTTP/1.0 request through nc (busybox's,
# also as `busybox nc` in a booted OS), so a refusal's one-line reason (the body) reaches
# the console either way.
sb_http_get() {
    _sb_wait=${3:-10}
    if command -v curl > /dev/null 2>&1; then
        _sb_code=$(curl -s --max-time "$_sb_wait" --max-filesize 65536 -o "$2" -w '%{http_code}' "$1" 2> /dev/null)
        echo "${_sb_code:-000}"
        return 0
    fi
    _sb_nc=nc
    command -v nc > /dev/null 2>&1 || _sb_nc="busybox nc"
    set -- "$1" "$2" $(sb_url_hostport "$1")
    _sb_path=/${1#http://*/}
    [ "$_sb_path" = "/$1" ] && _sb_path=/
    printf 'GET %s HTTP/1.0\r\nHost: %s:%s\r\nConnection: close\r\n\r\n' "$_sb_path" "$3" "$4" |
        $_sb_nc -w "$_sb_wait" "$3" "$4" 2> /dev/null | head -c 65536 > "$2.raw"
    sb_http_split "$2.raw" "$2"
}

# Splits a raw HTTP response $1: the body into file $2; prints the status code.
sb_http_split() {
    _sb_status=000
    _sb_in_body=
    : > "$2"
    while IFS= read -r _sb_line || [ -n "$_sb_line" ]; do
        if [ -n "$_sb_in_body" ]; then
            printf '%s\n' "$_sb_line" >> "$2"
            continue
        fi
        _sb_line=${_sb_line%"$SB_CR"}
        case "$_sb_status:$_sb_line" in
            000:HTTP/1.[01]\ [0-9][0-9][0-9]*) _sb_status=${_sb_line#HTTP/1.? }; _sb_status=${_sb_status%% *} ;;
            *:) _sb_in_body=1 ;;
        esac
    done < "$1"
    echo "$_sb_status"
}

# Text made safe for a URL's query: the characters of a console message, spaces as '+',
# at most 300 of them.
sb_query_text() {
    printf '%s' "$1" | tr -c 'A-Za-z0-9 ._:/,=()-' '_' | head -c 300 | tr ' ' '+'
}

# Tells the operator something ($1 a lower-case word, $2 one line): the boot service makes
# it a ClientNotice event. Best effort, one short try: it never stops a boot.
sb_notice() {
    [ -n "$SB_SERVER" ] && [ -n "$SB_MAC" ] || return 0
    mkdir -p "$SB_RUN"
    sb_http_get "$SB_SERVER/client/notice?mac=$SB_MAC&kind=$1&message=$(sb_query_text "$2")" \
        "$SB_RUN/notice" 5 > /dev/null
    return 0
}

# Tells the server the OS has booted (ClientBooted); false with the reason in SB_ERROR.
sb_report_booted() {
    mkdir -p "$SB_RUN"
    _sb_status=$(sb_http_get "$SB_SERVER/booted?mac=$SB_MAC" "$SB_RUN/booted")
    [ "$_sb_status" = 200 ] && return 0
    _sb_why=$(head -n 1 "$SB_RUN/booted" 2> /dev/null | tr -cd 'A-Za-z0-9 ._:/=,+()-' | head -c 200)
    sb_fail "the server did not take the report: ${_sb_why:-no answer} (HTTP $_sb_status)"
}

# Reads the session facts the initramfs left ($SB_RUN/session) into SB_SERVER, SB_MAC (and
# SB_IFACE, the boot NIC, empty when the initramfs did not say);
# false when there are none (not booted from streamboot) or they are malformed.
sb_load_session() {
    SB_SERVER= SB_MAC= SB_IFACE=
    [ -r "$SB_RUN/session" ] || return 1
    while IFS= read -r _sb_line; do
        case "$_sb_line" in
            SERVER=http://*) sb_valid "${_sb_line#SERVER=}" && SB_SERVER=${_sb_line#SERVER=} ;;
            MAC=*) sb_check_mac "${_sb_line#MAC=}" && SB_MAC=${_sb_line#MAC=} ;;
            IFACE=*) sb_check_iface "${_sb_line#IFACE=}" && SB_IFACE=${_sb_line#IFACE=} ;;
        esac
    done < "$SB_RUN/session"
    [ -n "$SB_SERVER" ] && [ -n "$SB_MAC" ]
}

# Redeems the one-time nonce: the answer's values in SB_* (sb_parse_answer). A refusal
# (403/404/410) is final; no answer at all is retried a few times.
sb_redeem() {
    mkdir -p "$SB_RUN"
    _sb_url="$SB_SERVER/session/redeem?nonce=$SB_NONCE"
    for _sb_try in 1 2 3 4 5; do
        _sb_status=$(sb_http_get "$_sb_url" "$SB_RUN/answer")
        case "$_sb_status" in
            200) sb_parse_answer "$SB_RUN/answer"; return ;;
            000) sleep 2 ;;
            *)
                _sb_why=$(head -n 1 "$SB_RUN/answer" 2> /dev/null | tr -cd 'A-Za-z0-9 ._:/=,+-' | head -c 200)
                sb_fail "the server refused the session: ${_sb_why:-no reason given} (HTTP $_sb_status); rebooting through PXE gets a new one"
                return 1
                ;;
        esac
    done
    sb_fail "no answer from the boot server at $SB_SERVER (is the network up, the server running?)"
}

# Prints "DEVICE FSTYPE" of the first blkid line (read on stdin, the `DEV: KEY="value"...`
# format of util-linux and busybox blkid) whose KEY is VALUE (case-insensitive).
sb_pick_dev() {
    _sb_want=$(echo " $1=\"$2\"" | tr 'A-Z' 'a-z')
    while IFS= read -r _sb_line; do
        _sb_low=$(echo "$_sb_line" | tr 'A-Z' 'a-z')
        case "$_sb_low" in
            *"$_sb_want"*)
                _sb_type=
                case "$_sb_line" in
                    *' TYPE="'*) _sb_type=${_sb_line#*' TYPE="'}; _sb_type=${_sb_type%%\"*} ;;
                esac
                echo "${_sb_line%%:*} $_sb_type"
                return 0
                ;;
        esac
    done
    return 1
}

# Prints "DEVICE FSTYPE" of the root named by streamboot.root ($1) among blkid lines on
# stdin; "whole" is the disk itself ($2).
sb_pick_root() {
    case "$1" in
        whole) sb_pick_dev DEVNAME "$2" ;;
        *) sb_pick_dev "${1%%=*}" "${1#*=}" ;;
    esac
}

# blkid lines for the devices given (util-linux prints nothing for an empty device).
sb_blkid() {
    for _sb_dev in "$@"; do
        [ -b "$_sb_dev" ] || continue
        _sb_out=$(blkid "$_sb_dev" 2> /dev/null) || continue
        echo "$_sb_out DEVNAME=\"$_sb_dev\""
    done
}

# Polls "$@" every 0.1 s for up to $SB_POLL_S seconds (15 when unset), until it succeeds: a
# device that appears a moment later costs that moment, not a whole second.
sb_poll() {
    _sb_polls=$(( ${SB_POLL_S:-15} * 10 ))
    while ! "$@"; do
        _sb_polls=$((_sb_polls - 1))
        [ "$_sb_polls" -gt 0 ] || return 1
        sleep 0.1
    done
}

sb_settle() {
    command -v udevadm > /dev/null 2>&1 && udevadm settle --timeout=5 > /dev/null 2>&1
    return 0
}

# The session's node first, then the other stream nodes of the answer's nbd_nodes=
# (host:port or [IPv6]:port, ...), each once.
sb_nbd_nodes() {
    case "$SB_NBD_HOST" in
        *:*) _sb_list="[$SB_NBD_HOST]:$SB_NBD_PORT" ;;
        *) _sb_list="$SB_NBD_HOST:$SB_NBD_PORT" ;;
    esac
    set -f
    for _sb_node in $(echo "$SB_NBD_NODES" | tr ',' ' '); do
        case "$_sb_node" in
            ?*:[0-9]*) ;;
            *) continue ;;
        esac
        case " $_sb_list " in *" $_sb_node "*) ;; *) _sb_list="$_sb_list $_sb_node" ;; esac
    done
    set +f
    echo "$_sb_list"
}

# Attaches $SB_NBD to the export: through streamboot-nbd (the kernel holds I/O while the
# stream node is gone, and the helper moves the disk to another node: docs/failover.md)
# when the initramfs has it, else nbd-client, which reconnects to the same node only.
# The helper asks the boot server (-s) for the live nodes when none of its list answers.
# -systemd-mark (and streamboot-nbd's own '@') keeps systemd from killing the process that
# holds the root at shutdown.
sb_nbd_connect() {
    if command -v streamboot-nbd > /dev/null 2>&1; then
        # The list is split on spaces, never globbed ("[::1]:10809" is a pattern).
        set -f
        # shellcheck disable=SC2046,SC2086
        $_sb_timeout streamboot-nbd -d "$SB_NBD" -s "$SB_SERVER" -N "$SB_EXPORT" ${_sb_ro:+-r} \
            $(sb_nbd_nodes)
        _sb_rc=$?
        set +f
        return $_sb_rc
    fi
    # shellcheck disable=SC2086
    $_sb_timeout nbd-client "$SB_NBD_HOST" "$SB_NBD_PORT" "$SB_NBD" -N "$SB_EXPORT" \
        -persist -systemd-mark $_sb_ro
}

# True once the root named by streamboot.root is on the attached disk: SB_ROOT_DEV and
# SB_ROOT_TYPE (empty when the device has no filesystem).
sb_find_root() {
    # shellcheck disable=SC2046
    _sb_found=$(sb_blkid "$SB_NBD" $(ls "$SB_NBD"p* 2> /dev/null) | sb_pick_root "$SB_ROOT" "$SB_NBD") ||
        return 1
    SB_ROOT_DEV=${_sb_found% *}
    SB_ROOT_TYPE=${_sb_found#* }
}

# modprobe nbd, nbd-client to the answer's export, wait for the root filesystem.
sb_attach() {
    modprobe nbd max_part=16 2> /dev/null
    SB_POLL_S=10 sb_poll [ -b "$SB_NBD" ] || { sb_fail "the kernel has no nbd driver ($SB_NBD missing after modprobe nbd)"; return 1; }
    mkdir -p "$SB_RUN"
    _sb_ro=
    case "$SB_WC" in client-*) _sb_ro=-readonly ;; esac
    sb_say "attaching nbd://$SB_NBD_HOST:$SB_NBD_PORT ($SB_WC write cache)"
    _sb_timeout=
    command -v timeout > /dev/null 2>&1 && _sb_timeout="timeout 30"
    for _sb_try in 1 2 3; do
        # Its output goes to a file: the daemon it forks keeps it open.
        if sb_nbd_connect > "$SB_RUN/nbd-client.log" 2>&1; then
            _sb_err=
            break
        fi
        _sb_err=$(tail -n 1 "$SB_RUN/nbd-client.log")
        sleep 2
    done
    [ -z "$_sb_err" ] || { sb_fail "cannot attach nbd://$SB_NBD_HOST:$SB_NBD_PORT: $_sb_err"; return 1; }
    # blkid reads the device nodes themselves (devtmpfs makes the partitions' nodes): udev,
    # whose probing of the new disk over the network is slow, is not waited for.
    if sb_poll sb_find_root; then
        [ -n "$SB_ROOT_TYPE" ] || { sb_fail "the root $SB_ROOT ($SB_ROOT_DEV) has no filesystem"; return 1; }
        return 0
    fi
    sb_fail "no filesystem $SB_ROOT on the streamed disk $SB_NBD (its partitions: $(ls "$SB_NBD"p* 2> /dev/null | tr '\n' ' '))"
}

# The local partition for a client-disk write cache: "DEVICE FSTYPE" of the first non-NBD
# device labelled streamboot-wc (filesystem LABEL or GPT PARTLABEL) among blkid lines on stdin.
sb_pick_wc() {
    : > "$SB_RUN/blkid.local"
    while IFS= read -r _sb_line; do
        case "$_sb_line" in /dev/nbd*) ;; *) echo "$_sb_line" >> "$SB_RUN/blkid.local" ;; esac
    done
    sb_pick_dev LABEL "$SB_WC_LABEL" < "$SB_RUN/blkid.local" ||
        sb_pick_dev PARTLABEL "$SB_WC_LABEL" < "$SB_RUN/blkid.local"
}

# Mounts the upper layer of a client-* write cache at $1 (RAM, or the local partition).
sb_mount_upper() {
    if [ "$SB_WC" = client-disk ]; then
        sb_settle
        if _sb_found=$(blkid 2> /dev/null | sb_pick_wc); then
            _sb_dev=${_sb_found% *}
            _sb_type=${_sb_found#* }
            if [ "$SB_PERSISTENCE" = discard ] || [ -z "$_sb_type" ]; then
                sb_say "formatting the local write cache $_sb_dev (persistence $SB_PERSISTENCE)"
                mkfs.ext4 -q -F -L "$SB_WC_LABEL" -E nodiscard "$_sb_dev" > /dev/null 2>&1 ||
                    { sb_fail "cannot format the local write cache $_sb_dev (mkfs.ext4)"; return 1; }
                _sb_type=ext4
            fi
            mount -t "$_sb_type" "$_sb_dev" "$1" ||
                { sb_fail "cannot mount the local write cache $_sb_dev"; return 1; }
            sb_say "write cache on the local partition $_sb_dev"
            return 0
        fi
        sb_say "no local partition labelled $SB_WC_LABEL: the client-disk write cache falls back to RAM (writes are lost at power-off)"
        sb_notice wc-ram-fallback "no local partition labelled $SB_WC_LABEL: the client-disk write cache is in RAM, writes are lost at power-off"
    fi
    mount -t tmpfs -o mode=0755 streamboot-wc "$1" || { sb_fail "cannot mount a tmpfs for the write cache"; return 1; }
}

# Every request to the streamed disk is a round trip over the network: reading ahead
# further than a local disk's default (128 KiB) takes a program's pages in fewer of them.
SB_READ_AHEAD_KB=${SB_READ_AHEAD_KB:-1024}
sb_read_ahead() {
    _sb_queue=/sys/block/${SB_NBD#/dev/}/queue/read_ahead_kb
    [ -w "$_sb_queue" ] && echo "$SB_READ_AHEAD_KB" > "$_sb_queue" 2> /dev/null
    return 0
}

# Mounts the attached root at $1 by write-cache type and gives it the session's identity.
sb_mount_root() {
    sb_read_ahead
    case "$SB_WC" in
        server-*)
            mount -t "$SB_ROOT_TYPE" -o rw "$SB_ROOT_DEV" "$1" ||
                { sb_fail "cannot mount the root $SB_ROOT_DEV ($SB_ROOT_TYPE) read-write"; return 1; }
            ;;
        client-*)
            modprobe overlay 2> /dev/null
            mkdir -p "$SB_RUN/lower" "$SB_RUN/rw"
            _sb_opts=ro
            # A read-only export: an unclean journal is not replayed into it.
            case "$SB_ROOT_TYPE" in ext3 | ext4) _sb_opts=ro,noload ;; esac
            mount -t "$SB_ROOT_TYPE" -o "$_sb_opts" "$SB_ROOT_DEV" "$SB_RUN/lower" ||
                { sb_fail "cannot mount the root $SB_ROOT_DEV ($SB_ROOT_TYPE) read-only"; return 1; }
            sb_mount_upper "$SB_RUN/rw" || return 1
            mkdir -p "$SB_RUN/rw/upper" "$SB_RUN/rw/work"
            mount -t overlay overlay \
                -o "lowerdir=$SB_RUN/lower,upperdir=$SB_RUN/rw/upper,workdir=$SB_RUN/rw/work" "$1" ||
                { sb_fail "cannot mount the overlay root (is the overlay module in the initramfs?)"; return 1; }
            ;;
    esac
    [ -z "$SB_HOSTNAME" ] || echo "$SB_HOSTNAME" > "$1/etc/hostname" ||
        { sb_fail "cannot write /etc/hostname into the root"; return 1; }
    [ -z "$SB_MACHINE_ID" ] || echo "$SB_MACHINE_ID" > "$1/etc/machine-id" ||
        { sb_fail "cannot write /etc/machine-id into the root"; return 1; }
    # What the booted OS may want to know about its session (kept in /run across the switch).
    {
        echo "SESSION_ID=$SB_SESSION_ID"
        echo "WRITE_CACHE=$SB_WC"
        echo "PERSISTENCE=$SB_PERSISTENCE"
        echo "SERVER=$SB_SERVER"
        echo "MAC=$SB_MAC"
        echo "IFACE=${SB_IFACE:-}"
    } > "$SB_RUN/session"
    rm -f "$SB_RUN/answer" "$SB_RUN/answer.raw"
    sb_say "root $SB_ROOT_DEV ($SB_ROOT_TYPE, $SB_WC) mounted as ${SB_HOSTNAME:-this machine}"
}
