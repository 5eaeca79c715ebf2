"""DhcpService.Options.receive_buffer: what the socket gets, and what `--set` accepts."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import subprocess
from pathlib import Path

import pytest
from virtualinux.bootsvc.dhcp import RECEIVE_BUFFER, DhcpService
from virtualinux.bootsvc.options import parse
from virtualinux.bootsvc.service import Replica
from virtualinux.vvcm import VlxError

RMEM_DEFAULT = int(Path("/proc/sys/net/core/rmem_default").read_text())


def granted(cluster, tmp_path, buffer: int | None) -> int:
    """The SO_RCVBUF the started service's socket has (the kernel doubles what is asked)."""
    replica = Replica(None, "lo", ipaddress.IPv4Address("127.0.0.1"), tmp_path, tmp_path)
    options = DhcpService.Options(port=0) if buffer is None else \
        DhcpService.Options(port=0, receive_buffer=buffer)

    async def run() -> int:
        service = DhcpService(replica, cluster, options)
        await service.start()
        try:
            # What the kernel says of the socket bound to the service's port (`ss -m`: rb).
            shown = subprocess.run(["ss", "-uanmH", f"sport = :{service.port}"],
                                   capture_output=True, text=True, check=True).stdout
            return int(re.search(r"\brb(\d+)", shown).group(1))
        finally:
            await service.stop()

    return asyncio.run(run())


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_BINDTODEVICE and SO_RCVBUFFORCE need root")
def test_the_receive_buffer_is_the_option_and_zero_leaves_the_kernel_default(db, tmp_path):
    cluster = db.load()
    assert granted(cluster, tmp_path, None) == 2 * RECEIVE_BUFFER
    assert granted(cluster, tmp_path, 1 << 20) == 2 << 20
    assert granted(cluster, tmp_path, 0) == RMEM_DEFAULT


def test_set_flag_is_typed_and_checked():
    assert parse(["dhcp"], ["dhcp.receive_buffer=0"])["dhcp"].receive_buffer == 0
    with pytest.raises(VlxError, match="receive_buffer"):
        parse(["dhcp"], ["dhcp.receive_buffer=-1"])
    with pytest.raises(VlxError, match="receive_buffer"):
        parse(["dhcp"], ["dhcp.receive_buffer=lots"])
