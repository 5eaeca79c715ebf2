"""What a booting node is told: iPXE scripts, kernel command lines and the per-node iSCSI login.

Every function here is pure: (cluster generation, node, kernel arguments) -> text or bytes.
The renderer writes their output into the netboot tree, and the TFTP and HTTP services call
the same functions on the fly, so a file on disk and a file made on the fly never differ.

The scripts name their files relative to `${next-server}` (the replica whose DHCP answer the
client took), so one script is right on every replica.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import PurePosixPath

from virtualinux.storage.naming import initiator_iqn
from virtualinux.vvcm import Cluster, Node, VlxError, host_keys
from virtualinux.vvcm.model import STORE_NODE_CA_OWNER, BootFilesOver, Role, Volume

from . import cpio, layout

HTTP_BASE = "http://${next-server}"
TFTP_BASE = "tftp://${next-server}"
ROOT_LABEL = "vroot"          # the golden root file system's label (mkfs.ext4 -L vroot)
BOOT_INTERFACE = "eth0"       # Debian names the first NIC eth0 in the initramfs
DISCOVER_MENU_TIMEOUT_MS = 30_000

# Text we put on an iPXE line or a kernel command line: iPXE would expand `${...}` and a space
# would start a new argument, so anything from the database is checked against this first.
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9._:,=/+@-]+")


class UnsafeValue(VlxError):
    """A value from the database that cannot go on an iPXE or kernel command line."""


def check_token(value: str, what: str) -> str:
    if not _SAFE_TOKEN.fullmatch(value):
        raise UnsafeValue(f"{what} {value!r} cannot go on a kernel command line "
                          "(allowed: letters, digits and . _ : , = / + @ -)")
    return value


# A CHAP user name or secret: printable ASCII without spaces. The initramfs writes it into an
# iSCSI node record file, one "name = value" line: a newline would add lines of its own, and
# iscsid trims spaces. Quotes, `$(...)` and `;` stay data (the file is shell-quoted).
_CHAP_TEXT = re.compile(r"[!-~]{1,255}")


def check_chap(value: str, what: str) -> str:
    if not _CHAP_TEXT.fullmatch(value):
        raise UnsafeValue(f"{what} cannot go into an iSCSI login: printable ASCII without "
                          "spaces, 1 to 255 characters (a newline, NUL, space or other control "
                          "character is refused)")
    return value


def check_kernel_args(args: Sequence[str]) -> tuple[str, ...]:
    return tuple(check_token(arg, "kernel argument") for arg in args)


def boot_script() -> str:
    """boot.ipxe: the same for every client and every generation."""
    return f"""#!ipxe
# virtualinux: every iPXE client runs this first. It chains the script the cluster database
# has for this MAC; a machine the database does not know gets a menu.
:start
chain --autofree {layout.NODE_SCRIPT_DIR}/${{mac:hexhyp}}.ipxe || goto unknown

:unknown
menu virtualinux: MAC ${{mac}} has no node in the cluster database, or its boot failed
item --key d discover Metamaster discovery (boot the shared image with DHCP)
item --key l local    Local boot (leave iPXE)
item --key r retry    Retry (the database may know this machine now)
choose --timeout {DISCOVER_MENU_TIMEOUT_MS} --default retry target || goto retry
goto ${{target}}

:discover
chain --autofree {layout.DISCOVER_SCRIPT} || goto unknown

:local
exit

:retry
# Ask DHCP again: the replica that handed out this script may be the one that failed, and
# ${{filename}} then names boot.ipxe on a replica that answers.
dhcp || goto retry
chain --autofree ${{filename}} || goto unknown
"""


def files_base(cluster: Cluster) -> str:
    """Where iPXE fetches kernel and initrds from: the cluster setting `boot_files_over`."""
    over = cluster.settings.boot_files_over if cluster.settings else BootFilesOver.HTTP
    return TFTP_BASE if over == BootFilesOver.TFTP else HTTP_BASE


def discover_script(kernel_args: Sequence[str], base: str = HTTP_BASE) -> str:
    """discover.ipxe: an unknown machine boots the shared image with DHCP, in discovery mode.
    `base`: files_base() of the cluster."""
    args = " ".join(["initrd=" + _basename(layout.INITRD), "ip=dhcp", "vlx.mode=discover",
                     *check_kernel_args(kernel_args)])
    return f"""#!ipxe
# virtualinux: metamaster discovery for a machine the cluster database does not know yet.
kernel {base}/{layout.KERNEL} {args} || goto failed
initrd {base}/{layout.INITRD} || goto failed
boot || goto failed

:failed
echo virtualinux: discovery boot failed
exit 1
"""


def root_volume(cluster: Cluster, node: Node) -> Volume | None:
    """The node's root: a snapshot volume it owns that is exported (has an iqn and a portal)."""
    candidates = sorted((v for v in cluster.volumes_owned_by(node.name)
                         if v.kind == "snapshot" and v.iqn and v.portal),
                        key=lambda v: v.name)
    return candidates[0] if candidates else None


def _portal(volume: Volume) -> tuple[str, str]:
    address, sep, port = (volume.portal or "").rpartition(":")
    if not sep:
        address, port = volume.portal or "", "3260"
    check_token(address, f"portal of volume {volume.name}")
    if not port.isdigit():
        raise UnsafeValue(f"portal {volume.portal!r} of volume {volume.name}: bad port")
    return address, port


def kernel_cmdline(cluster: Cluster, node: Node, kernel_args: Sequence[str]) -> str:
    """The node's kernel command line: who it is, its address, and where its root lives.

    The CHAP secret is not here (anyone on the node can read /proc/cmdline): it travels in the
    node's own cpio (`node_cpio`), appended as a second initrd.
    """
    if cluster.settings is None:
        raise VlxError("the cluster has no settings yet (vlx db import an inventory first)")
    settings = cluster.settings
    volume = root_volume(cluster, node)
    args = ["initrd=" + _basename(layout.INITRD)]
    if volume is not None:
        args.append("initrd=" + _basename(layout.node_cpio_name(node.mac)))
    # Typed addresses, but checked as text too: a forged row must not reach iPXE or the kernel.
    args.append(f"ip={check_token(str(node.ip), 'node address')}::"
                f"{check_token(str(settings.gateway_vip), 'gateway address')}:"
                f"{settings.cidr.netmask}:"
                f"{check_token(node.name, 'node name')}:{BOOT_INTERFACE}:off")
    args.append(f"vlx.node={node.name}")
    store = cluster.store_url()
    if store is not None:
        args.append(f"vlx.store={check_token(store, 'store URL')}")
    if volume is not None:
        address, port = _portal(volume)
        iqn = check_token(volume.iqn or "", f"iqn of volume {volume.name}")
        args += [f"vlx.root=iscsi:{address}:{port}:{iqn}", f"root=LABEL={ROOT_LABEL}", "rw"]
    args += check_kernel_args(kernel_args)
    return " ".join(args)


def node_script(cluster: Cluster, node: Node, kernel_args: Sequence[str]) -> str:
    """nodes/MAC.ipxe: kernel, shared initrd, the node's own cpio, and its command line."""
    cmdline = kernel_cmdline(cluster, node, kernel_args)
    base = files_base(cluster)
    lines = [
        "#!ipxe",
        f"# virtualinux: {node.name} ({node.mac}, {node.ip}), "
        f"cluster database generation {cluster.generation}",
        f"kernel {base}/{layout.KERNEL} {cmdline} || goto failed",
        f"initrd {base}/{layout.INITRD} || goto failed",
    ]
    if root_volume(cluster, node) is not None:
        lines.append(f"initrd {base}/{layout.node_cpio_name(node.mac)} || goto failed")
    lines += [
        "boot || goto failed",
        "",
        ":failed",
        f"echo virtualinux: booting {node.name} failed",
        "exit 1",
        "",
    ]
    return "\n".join(lines)


HIDDEN_SECRET = "(secret, not shown)"


def iscsi_initramfs(cluster: Cluster, node: Node, show_secret: bool = True) -> str | None:
    """etc/iscsi.initramfs for initramfs-tools' open-iscsi hook, or None without a root volume.

    The hook sources this file with the shell, so every value is quoted: a secret is data.
    `show_secret=False` renders the same file for a person to read, the password replaced.
    """
    volume = root_volume(cluster, node)
    if volume is None:
        return None
    address, port = _portal(volume)
    # Each value also becomes a line of an iSCSI node record in the initramfs: checked here,
    # not only where the kernel command line is made (the cpio is made on its own).
    values = {
        # The name storage's tgt ACL admits (one function for both sides).
        "ISCSI_INITIATOR": check_token(initiator_iqn(cluster.settings.name if cluster.settings
                                                     else "virtualinux", node.name),
                                       f"initiator name of {node.name}"),
        "ISCSI_TARGET_NAME": check_token(volume.iqn or "", f"iqn of volume {volume.name}"),
        "ISCSI_TARGET_IP": address,
        "ISCSI_TARGET_PORT": port,
    }
    credential = cluster.credential(node.name)
    if credential is not None:
        values["ISCSI_USERNAME"] = check_chap(credential.username, f"CHAP user of {node.name}")
        check_chap(credential.secret, f"the CHAP secret of {node.name}")   # never shown
        values["ISCSI_PASSWORD"] = credential.secret if show_secret else HIDDEN_SECRET
    return "".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items())


NODE_FILES_DIR = "etc/virtualinux/node"    # the initramfs moves it to /run/virtualinux/node
RUN_NODE_FILES = "/run/virtualinux/node"    # where start-up and the units find them
STORE_TLS_DIR = "store"                     # VLX_STORE_TLS: ca.crt, client.crt, client.key
STORE_ENV = "store.env"                     # read by the units (EnvironmentFile=-)


def node_files(cluster: Cluster, node: Node) -> dict[str, bytes]:
    """The node's private files beside its iSCSI login (path in NODE_FILES_DIR -> bytes): its
    SSH host key and, when the store has a CA, its own store certificate (`store/`: ca.crt,
    client.crt and client.key, and for a db node NAME.crt and NAME.key for its member) with
    `store.env` pointing the units at it. The initramfs hands them to start-up through /run."""
    files = {}
    seed = host_keys.seed_of(cluster, node.name)
    if seed is not None:
        files[host_keys.NODE_FILE] = host_keys.node_file(seed)
    # Only a store with a CA issues certificates: cluster_ca (cryptography's x509) is
    # imported then, not on every node start-up and replica start (~1 s each in TCG).
    pair = None
    if cluster.credential(STORE_NODE_CA_OWNER) is not None:
        from virtualinux.vvcm import cluster_ca
        pair = cluster_ca.node_pair(cluster, node)
    if pair is not None:
        store = STORE_TLS_DIR
        files[f"{store}/ca.crt"] = cluster_ca.ca_cert(cluster).encode()
        names = ["client"] + ([check_token(node.name, "node name")]
                              if Role.DB in node.roles else [])
        for name in names:
            files[f"{store}/{name}.crt"] = pair.cert.encode()
            files[f"{store}/{name}.key"] = pair.key.encode()
        files[STORE_ENV] = f"VLX_STORE_TLS={RUN_NODE_FILES}/{store}\n".encode()
    return files


def node_cpio(cluster: Cluster, node: Node) -> bytes | None:
    """nodes/MAC.cpio: a newc archive holding etc/iscsi.initramfs and the node's files in
    etc/virtualinux/node/ (all mode 0600, directories 0700), or None without a root volume."""
    text = iscsi_initramfs(cluster, node)
    if text is None:
        return None
    entries = [cpio.directory("etc"),
               cpio.regular("etc/iscsi.initramfs", text.encode(), 0o600)]
    extra = node_files(cluster, node)
    if extra:
        directories = ["etc/virtualinux", NODE_FILES_DIR] + sorted(
            {f"{NODE_FILES_DIR}/{name.rsplit('/', 1)[0]}" for name in extra if "/" in name})
        entries += [cpio.directory(directory, 0o700) for directory in directories]
        entries += [cpio.regular(f"{NODE_FILES_DIR}/{name}", data, 0o600)
                    for name, data in sorted(extra.items())]
    return cpio.archive(entries, align=512)


def _basename(path: str) -> str:
    return PurePosixPath(path).name
