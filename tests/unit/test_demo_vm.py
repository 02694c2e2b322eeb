"""`streamboot client vm MAC` (streamboot/demo_vm.py): the VM is pointed at the running
system's boot entry script, and a system a VM cannot reach (loopback) or not running is
refused with what to do."""

from __future__ import annotations

import pytest

from shared.errors import OperatorError
from streamboot.demo_vm import boot_entry_url, vm_argv


def running(boot_http: str) -> dict[str, object]:
    return {"api_url": "http://x", "endpoints": {"boot_http": boot_http}}


def test_the_vm_boots_the_boot_services_entry_script_through_qemus_own_dhcp() -> None:
    url = boot_entry_url(running("http://192.0.2.2:18082"))
    assert url == "http://192.0.2.2:18082/ipxe/boot.ipxe"
    argv = vm_argv(url, "52:54:00:77:00:01", 768)
    assert argv[argv.index("-netdev") + 1] == f"user,id=n0,bootfile={url}"
    assert argv[argv.index("-device") + 1] == "virtio-net-pci,netdev=n0,mac=52:54:00:77:00:01"
    assert "accel=tcg" in argv[argv.index("-machine") + 1] and "768" in argv
    assert "accel=kvm" in " ".join(vm_argv(url, "52:54:00:77:00:01", kvm=True))


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "localhost", "127.0.0.5"])
def test_a_system_on_loopback_is_refused_saying_how_to_start_it(host: str) -> None:
    with pytest.raises(OperatorError, match="STREAMBOOT_BIND_HOST"):
        boot_entry_url(running(f"http://{host}:18082"))


def test_no_running_system_is_refused() -> None:
    with pytest.raises(OperatorError, match="not running"):
        boot_entry_url({})
