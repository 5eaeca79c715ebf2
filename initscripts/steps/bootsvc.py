"""12 boot services: this node's own replica, serving a netboot tree made on this node.

The tree is rendered from the kernel and initrd the node booted (its own root holds them, in
/boot, as the golden image has them), Debian's iPXE binaries and the database; every node
renders the same bytes from the same golden and generation, so no node depends on another's
disk. The replica runs every service the node serves: DHCP, TFTP and HTTP always, DNS when it
is built, the gateway heartbeat on the gateway pair. `virtualinux-bootsvc.service` runs it
with the environment file written here.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from virtualinux.netboot import render
from virtualinux.netboot.scripts import BOOT_INTERFACE

from ..files import SERVICE_FILE_HEADER, plain, write_if_changed
from ..services import restart_if_changed
from ..startup import Boot, Step, StepFailed
from . import database

ENV_FILE = "/etc/default/virtualinux-bootsvc"
NETBOOT_OUT = "/var/lib/virtualinux/netboot"
BOOT_IMAGE_DIR = "/run/virtualinux/boot-image"
ALWAYS = ("dhcp", "tftp", "http")


def services_for(boot: Boot) -> tuple[str, ...]:
    services = list(ALWAYS)
    if _built("dns"):
        services.append("dns")
    if _built("heartbeat") and boot.node.is_gateway:
        services.append("heartbeat")
    settings = boot.cluster.settings
    if _built("ra") and (settings is None or settings.router_advertisements):
        services.append("ra")
    return tuple(services)


def _built(service: str) -> bool:
    return importlib.util.find_spec(f"virtualinux.bootsvc.{service}") is not None


def running_kernel(boot: Boot) -> tuple[Path, Path]:
    """/boot's kernel and initrd of the running kernel (in tests: the only one there)."""
    boot_dir = boot.path("/boot")
    if boot.live:
        version = os.uname().release
    else:
        kernels = sorted(boot_dir.glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise StepFailed(f"expected one kernel in {boot_dir}, found {len(kernels)}")
        version = kernels[0].name.removeprefix("vmlinuz-")
    kernel, initrd = boot_dir / f"vmlinuz-{version}", boot_dir / f"initrd.img-{version}"
    for path in (kernel, initrd):
        if not path.is_file():
            raise StepFailed(f"{path} is missing: this node cannot serve the image it booted")
    return kernel, initrd


def boot_image_dir(boot: Boot) -> Path:
    """A boot image directory (vmlinuz, initrd.img) pointing at the running kernel's files."""
    kernel, initrd = running_kernel(boot)
    directory = boot.path(BOOT_IMAGE_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    for name, target in (("vmlinuz", kernel), ("initrd.img", initrd)):
        link = directory / name
        if not link.is_symlink() or os.readlink(link) != str(target):
            fresh = directory / f".{name}.new"
            fresh.unlink(missing_ok=True)
            fresh.symlink_to(target)
            os.replace(fresh, link)
    return directory


def environment(boot: Boot, services: tuple[str, ...]) -> str:
    values = {"VLX_NODE": plain(boot.node.name, "node name"),
              "VLX_INTERFACE": BOOT_INTERFACE,
              "VLX_SERVICES": ",".join(services),
              "VLX_NETBOOT_ROOT": f"{NETBOOT_OUT}/{render.CURRENT}"}
    values.update(database.store_variables(boot))
    lines = [SERVICE_FILE_HEADER]
    lines += [f"{key}={value}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def run(boot: Boot) -> str:
    if boot.cluster.settings is None:
        raise StepFailed("the database has no cluster settings")
    rendered = render.render(boot.cluster, boot_image_dir(boot), boot.path(NETBOOT_OUT),
                             boot.cluster.settings.kernel_args, boot.path(str(render.IPXE_DIR)))
    services = services_for(boot)
    changed = write_if_changed(boot.path(ENV_FILE), environment(boot, services))
    restart_if_changed(boot, "virtualinux-bootsvc.service", changed)
    return (f"replica {','.join(services)} on {BOOT_INTERFACE}, tree {rendered.root.name}"
            f"{'' if rendered.changed else ' (unchanged)'}")


# Right after identity, before the other steps: the replica needs nothing else of them (VC
# bridges and the gateway's uplink it follows through netlink as they come), and at its
# default CPU weight it gets the node's one CPU before the rest of start-up (weight 20).
STEP = Step(name="bootsvc", order=12, run=run, needs=("identity",),
            makes=f"{NETBOOT_OUT}/current, {ENV_FILE}, virtualinux-bootsvc.service running")
