"""``python -m services.boot``: the boot service (DHCP, TFTP, iPXE HTTP, hand-off)."""

from services.boot.service import start
from shared.service import run_service

if __name__ == "__main__":
    run_service("boot", start)
