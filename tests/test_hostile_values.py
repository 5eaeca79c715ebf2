"""Hostile values from the database never run: every renderer that puts a host name, an address
or a secret into a shell-read file, a unit's environment, chrony's or libvirt's configuration,
/etc/hosts, an iPXE script, a kernel command line or the per-node cpio either refuses the value
with one clear error or keeps it inert data.

The model refuses these values at its door (`vlx` input, TOML, a database decode); here they
are put into a Cluster behind its back, as a damaged or forged database row would be, to show
that each renderer checks for itself."""

from __future__ import annotations

import dataclasses
import io
import subprocess
from pathlib import Path

import pytest
from virtualinux.initscripts import startup
from virtualinux.initscripts.files import plain
from virtualinux.initscripts.steps import bootsvc, chrony, database, identity, libvirtd, sshkeys
from virtualinux.netboot import files, scripts
from virtualinux.vvcm import Credential, VlxError, Volume, changes, inventory
from virtualinux.vvcm.model import Cluster

from .conftest import EXAMPLE

HOSTILE = ["a b", "x;reboot", "$(reboot)", "`reboot`", "a\nb", "a\rb", "q'uote", 'q"uote',
           "a\0b", "a\tb", "${IFS}", "a#b", "a|b", "a&b", "a>b", "%00", "a\\b"]
# What a shell-quoted value may keep (it is data there); everything else must be refused.
INERT_IN_QUOTES = ["x;reboot", "$(touch${IFS}PWNED)", "`touch${IFS}PWNED`", "q'uote", 'q"uote',
                   "${IFS}", "a#b", "a|b", "a&b", "a>b", "a\\b"]


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    loaded = inventory.apply(Cluster(generation=0, settings=None), inventory.load(EXAMPLE), "t")
    golden = Volume(name="golden", kind="golden", backend="reflink", path="/pool/golden",
                    size=1 << 30)
    root = Volume(name="node1-root", kind="snapshot", backend="reflink", path="/pool/node1",
                  size=1 << 30, origin="golden", owner="node1",
                  iqn="iqn.2026-11.lab.cluster:node1-root", portal="198.18.0.254:3260")
    loaded = changes.put_volumes(loaded, [golden, root])
    return dataclasses.replace(loaded, credentials=loaded.credentials + (
        Credential("node1", "node1", "Secret0123"),))


def forged(cluster: Cluster, node: str = "node1", **values) -> Cluster:
    """The cluster with node's fields replaced, past the model's checks."""
    nodes = tuple(dataclasses.replace(n, **values) if n.name == node else n
                  for n in cluster.nodes)
    return dataclasses.replace(cluster, nodes=nodes)


def with_volume(cluster: Cluster, **values) -> Cluster:
    volumes = tuple(dataclasses.replace(v, **values) if v.name == "node1-root" else v
                    for v in cluster.volumes)
    return dataclasses.replace(cluster, volumes=volumes)


def with_chap(cluster: Cluster, username: str = "node1", secret: str = "Secret0123") -> Cluster:
    others = tuple(c for c in cluster.credentials if c.owner != "node1")
    return dataclasses.replace(cluster, credentials=others + (
        Credential("node1", username, secret),))


def boot_for(cluster: Cluster, root: Path, node: str = "node1") -> startup.Boot:
    return startup.Boot(node=cluster.node(node), cluster=cluster, root=root)


@pytest.mark.parametrize("value", HOSTILE)
def test_plain_refuses_every_hostile_value(value):
    with pytest.raises(VlxError, match="cannot go into a configuration file"):
        plain(value, "value")


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_node_name_never_reaches_a_file_of_the_node(cluster, tmp_path, value):
    bad = forged(cluster, name=value)
    node = next(n for n in bad.nodes if n.name == value)
    for render in (lambda: identity.hosts_file(boot_for(bad, tmp_path, value)),
                   lambda: identity.run(boot_for(bad, tmp_path, value)),
                   lambda: chrony.chrony_conf(bad, bad.node("node2")),     # as a peer
                   lambda: database.member_environment(boot_for(bad, tmp_path, value),
                                                       "m=http://198.18.0.11:2380", "",
                                                       ("--name", value)),
                   lambda: database.new_cluster(boot_for(bad, tmp_path, value)),
                   lambda: bootsvc.environment(boot_for(bad, tmp_path, value), ("dhcp",)),
                   lambda: scripts.kernel_cmdline(bad, node, ()),
                   lambda: scripts.node_script(bad, node, ()),
                   lambda: scripts.node_cpio(bad, node)):
        try:
            text = render()
        except VlxError:
            continue                                 # refused: fine
        if text is None:
            continue                                 # no cpio for a node without a root
        # Not refused: then the value did not get in at all (chrony peers by address only,
        # the cpio names no host; its target and initiator come from the volume and settings).
        text = text.decode() if isinstance(text, bytes) else text
        assert value not in text, (render, text)
    assert not (tmp_path / "etc").exists() or value not in (tmp_path / "etc/hosts").read_text()


@pytest.mark.parametrize("value", ["198.18.0.11\n198.18.0.66 evil", "198.18.0.11;reboot",
                                   "$(reboot)", "198.18.0.11 x"])
def test_a_hostile_address_is_refused_by_hosts_chrony_and_the_command_line(cluster, tmp_path,
                                                                           value):
    bad = forged(cluster, ip=value)
    with pytest.raises(VlxError):
        identity.hosts_file(boot_for(bad, tmp_path))
    assert "node1" in [peer.name for peer in chrony.peers_of(bad, bad.node("node2"))]
    with pytest.raises(VlxError):
        chrony.chrony_conf(bad, bad.node("node2"))
    with pytest.raises(VlxError):
        scripts.kernel_cmdline(bad, bad.node("node1"), ())
    bad_settings = dataclasses.replace(cluster, settings=dataclasses.replace(
        cluster.settings, ntp_servers=(value,)))
    with pytest.raises(VlxError):
        chrony.chrony_conf(bad_settings, cluster.node("node1"))


@pytest.mark.parametrize("field", ["iqn", "portal"])
@pytest.mark.parametrize("value", ["iqn.x\nnode.conn[0].address = 198.18.0.66", "a b",
                                   "iqn.x;reboot", "$(reboot)", "iqn'x", "a\0b"])
def test_a_hostile_target_or_portal_never_reaches_the_cpio_or_the_command_line(
        cluster, field, value):
    bad = with_volume(cluster, **{field: value})
    node = bad.node("node1")
    for render in (lambda: scripts.node_cpio(bad, node),
                   lambda: scripts.kernel_cmdline(bad, node, ()),
                   lambda: scripts.node_script(bad, node, ())):
        with pytest.raises(scripts.UnsafeValue):
            render()
    # A replica asked for that node's cpio answers "not found" and goes on serving.
    boot_files = files.BootFiles(Path("/nonexistent"), bad)
    with pytest.raises(files.FileMissing):
        boot_files.lookup("nodes/52-54-00-00-00-11.cpio", client="198.18.0.11")


@pytest.mark.parametrize("value", ["a b", "a\nnode.conn[0].address = 198.18.0.66", "a\0b",
                                   "a\tb", "", "x" * 256, "caf\u00e9"])
@pytest.mark.parametrize("field", ["username", "secret"])
def test_a_chap_value_that_would_break_the_node_record_is_refused(cluster, field, value):
    bad = with_chap(cluster, **{field: value})
    with pytest.raises(scripts.UnsafeValue, match="cannot go into an iSCSI login") as refused:
        scripts.node_cpio(bad, bad.node("node1"))
    if field == "secret" and value:
        assert value not in str(refused.value)           # the error never shows the secret


@pytest.mark.parametrize("secret", INERT_IN_QUOTES)
def test_shell_metacharacters_in_a_secret_stay_data_in_the_initramfs(cluster, tmp_path, secret):
    """The initramfs sources etc/iscsi.initramfs with sh: the value comes out byte for byte and
    nothing runs (a `touch` would leave PWNED behind)."""
    bad = with_chap(cluster, secret=secret.replace("PWNED", str(tmp_path / "PWNED")))
    text = scripts.iscsi_initramfs(bad, bad.node("node1"))
    conf = tmp_path / "iscsi.initramfs"
    conf.write_text(text)
    said = subprocess.run(["sh", "-c", f'. "{conf}"; printf "%s" "$ISCSI_PASSWORD"'],
                          capture_output=True, text=True, check=True, cwd=tmp_path)
    assert said.stdout == bad.credential("node1").secret
    assert not (tmp_path / "PWNED").exists()


def test_start_up_with_a_hostile_name_fails_its_steps_and_writes_nothing(cluster, tmp_path):
    bad = forged(cluster, name="node1;reboot")
    outcomes = startup.run_steps(boot_for(bad, tmp_path, "node1;reboot"),
                                 [identity.STEP, chrony.STEP, libvirtd.STEP, sshkeys.STEP],
                                 out=io.StringIO())
    assert outcomes[0].state == "failed" and "cannot go into" in outcomes[0].message
    assert [o.state for o in outcomes[1:3]] == ["skipped", "skipped"]   # they need identity
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all("reboot" not in p.read_text() for p in written), written
    assert not (tmp_path / "etc/hosts").exists() and not (tmp_path / "etc/hostname").exists()


def test_the_ipxe_script_and_command_line_take_only_checked_tokens(cluster):
    for arg in ["console=ttyS0\nshell", "a b", "${net0/ip}", "x;y", "q'x"]:
        with pytest.raises(scripts.UnsafeValue):
            scripts.node_script(cluster, cluster.node("node1"), [arg])
    # And the script of a clean node holds no secret and nothing iPXE would expand from data.
    script = scripts.node_script(cluster, cluster.node("node1"), ["console=ttyS0"])
    assert "Secret0123" not in script
