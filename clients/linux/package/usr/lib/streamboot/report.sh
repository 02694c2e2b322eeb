#!/bin/sh
# Tells the streamboot server about this machine, from the booted OS:
#   report.sh booted            the OS reached multi-user (streamboot-booted.service)
#   report.sh notice KIND TEXT  something the operator must see (a ClientNotice event;
#                               KIND a lower-case word, TEXT one line)
# The session is the one the initramfs left in /run/streamboot/session; without it (the
# image booted some other way) there is nobody to tell and it does nothing.

. /usr/lib/streamboot/client.sh

sb_load_session || exit 0
case "$1" in
    booted)
        sb_report_booted || { echo "streamboot: $SB_ERROR" >&2; exit 1; }
        ;;
    notice)
        [ -n "$2" ] && [ -n "$3" ] || { echo "usage: $0 notice KIND TEXT" >&2; exit 2; }
        sb_notice "$2" "$3"
        ;;
    *)
        echo "usage: $0 booted | notice KIND TEXT" >&2
        exit 2
        ;;
esac
