"""Names in the netboot tree that DHCP, TFTP, HTTP and the rendered scripts must agree on.

The tree, as TFTP and HTTP serve it from its root:
    undionly.kpxe            iPXE for BIOS PXE clients (Debian's ipxe package)
    ipxe.efi, snponly.efi    iPXE for UEFI x86-64 clients
    arm64/ipxe.efi           iPXE for UEFI arm64 clients, when Debian ships it
    boot.ipxe                what every iPXE client runs first: chains its node's script
    nodes/MAC.ipxe           one node's script (MAC as iPXE's ${mac:hexhyp}, 52-54-00-00-00-11)
    images/...               kernels, initrds and root images named by the scripts
"""

from __future__ import annotations

BIOS_BOOTFILE = "undionly.kpxe"
UEFI_X86_64_BOOTFILE = "snponly.efi"
UEFI_ARM64_BOOTFILE = "arm64/ipxe.efi"
IPXE_SCRIPT = "boot.ipxe"
NODE_SCRIPT_DIR = "nodes"
IMAGES_DIR = "images"

# DHCP option 93 (RFC 4578, IANA registry) -> boot file.
ARCH_BOOTFILES = {
    0x0000: BIOS_BOOTFILE,        # x86 BIOS
    0x0006: UEFI_X86_64_BOOTFILE,  # x86 UEFI (32-bit firmware; no build of ours, closest fit)
    0x0007: UEFI_X86_64_BOOTFILE,  # x86-64 UEFI
    0x0009: UEFI_X86_64_BOOTFILE,  # EBC, sent by some x86-64 firmware
    0x000B: UEFI_ARM64_BOOTFILE,   # arm64 UEFI
}


def node_script_name(mac: str) -> str:
    """`nodes/52-54-00-00-00-11.ipxe` for MAC 52:54:00:00:00:11."""
    return f"{NODE_SCRIPT_DIR}/{mac.lower().replace(':', '-')}.ipxe"


# Added for the renderer and the services (names only; what goes in them is netboot/scripts.py).
KERNEL = f"{IMAGES_DIR}/vmlinuz"
INITRD = f"{IMAGES_DIR}/initrd.img"
DISCOVER_SCRIPT = "discover.ipxe"     # what an unknown machine may boot: the discovery image
MANIFEST = "netboot.json"             # the rendered tree's generation and kernel arguments
IPXE_BINARIES = ("undionly.kpxe", "ipxe.efi", "snponly.efi")   # from Debian's /usr/lib/ipxe


def node_cpio_name(mac: str) -> str:
    """`nodes/52-54-00-00-00-11.cpio`: the node's second initrd (its iSCSI login, CHAP secret)."""
    return f"{NODE_SCRIPT_DIR}/{mac.lower().replace(':', '-')}.cpio"
