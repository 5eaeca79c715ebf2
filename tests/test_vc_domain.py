"""Domain XML and VC network plans rendered from the database: golden texts, every variant
checked by libvirt's own schema (virt-xml-validate), and the errors an operator can meet
without any hypervisor running (Xen is not there on these machines)."""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import subprocess

import libvirt
import pytest
from virtualinux.storage.naming import initiator_iqn
from virtualinux.vvcm import changes
from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.model import Cluster, Credential, Node, Settings, VirtualCluster, Volume
from virtualinux.vvcm.virt import network
from virtualinux.vvcm.virt.connect import hypervisor_of, node_uri, silence_libvirt
from virtualinux.vvcm.virt.domain import domain_xml

from .conftest import require, vlx

QEMU_KERNEL_BOOT = """\
<domain type="qemu">
  <name>blue-1</name>
  <uuid>f1078ca7-f18b-5d0b-9184-ff44428da9b0</uuid>
  <title>VM 1 of virtual cluster blue</title>
  <memory unit="MiB">256</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch="x86_64" machine="pc">hvm</type>
    <kernel>/boot/vmlinuz</kernel>
    <initrd>/boot/initrd.img</initrd>
    <cmdline>console=ttyS0 ip=::::blue-1:eth0:dhcp quiet</cmdline>
  </os>
  <features>
    <acpi />
    <apic />
  </features>
  <cpu mode="custom" match="exact">
    <model fallback="allow">qemu64</model>
  </cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type="file" device="disk">
      <driver name="qemu" type="qcow2" cache="none" />
      <source file="/pool/blue-1-disk.qcow2" />
      <target dev="vda" bus="virtio" />
    </disk>
    <interface type="bridge">
      <mac address="02:79:9f:43:3f:9d" />
      <source bridge="vlxbr100" />
      <model type="virtio" />
      <mtu size="1450" />
    </interface>
    <serial type="pty">
      <log file="/var/log/virtualinux/vms/blue-1.log" append="on" />
      <target port="0" />
    </serial>
    <console type="pty">
      <target type="serial" port="0" />
    </console>
    <memballoon model="none" />
  </devices>
</domain>
"""

XEN_PV_KERNEL_BOOT = """\
<domain type="xen">
  <name>blue-1</name>
  <uuid>f1078ca7-f18b-5d0b-9184-ff44428da9b0</uuid>
  <title>VM 1 of virtual cluster blue</title>
  <memory unit="MiB">256</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch="x86_64" machine="xenpv">linux</type>
    <kernel>/boot/vmlinuz</kernel>
    <initrd>/boot/initrd.img</initrd>
    <cmdline>console=hvc0 ip=::::blue-1:eth0:dhcp quiet</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type="file" device="disk">
      <driver name="qemu" type="qcow2" cache="none" />
      <source file="/pool/blue-1-disk.qcow2" />
      <target dev="xvda" bus="xen" />
    </disk>
    <interface type="bridge">
      <mac address="02:79:9f:43:3f:9d" />
      <source bridge="vlxbr100" />
      <mtu size="1450" />
    </interface>
    <console type="pty">
      <log file="/var/log/virtualinux/vms/blue-1.log" append="on" />
      <target type="xen" port="0" />
    </console>
  </devices>
</domain>
"""

KVM_DISK_BOOT_OS = """\
  <os>
    <type arch="x86_64" machine="pc">hvm</type>
    <boot dev="hd" />
  </os>
"""

KERNEL = {"kernel": "/boot/vmlinuz", "initrd": "/boot/initrd.img", "cmdline": "quiet"}


def cluster(backend: str = "qcow2", settings: dict | None = None, **vc_fields) -> Cluster:
    """Node node1, VC blue of 2 VMs (198.19.6.0/24, VXLAN 100); blue-1 has a disk."""
    base = Settings(name="lab", domain="c.lab", cidr=ipaddress.IPv4Network("198.18.0.0/24"),
                    gateway_vip=ipaddress.IPv4Address("198.18.0.254"), **(settings or {}))
    c = changes.add_node(Cluster(0, base), Node(
        name="node1", mac="52:54:00:00:00:11", ip=ipaddress.IPv4Address("198.18.0.11"),
        cpus=4, memory=2048))
    c = changes.define_vc(c, VirtualCluster(
        name="blue", vms=2, vcpus=2, memory=256, cidr=ipaddress.IPv4Network("198.19.6.0/24"),
        **vc_fields))
    # "iscsi": a reflink clone exported over iSCSI, with blue-1's CHAP login.
    iscsi = backend == "iscsi"
    backend = "reflink" if iscsi else backend
    disk = {"qcow2": "/pool/blue-1-disk.qcow2", "reflink": "/pool/blue-1-disk",
            "lvm-thin": "/dev/vg/blue-1-disk"}[backend]
    export = {"iqn": "iqn.2026-11.org.virtualinux:lab.blue-1-disk",
              "portal": "198.18.0.13:3260"} if iscsi else {}
    c = changes.put_volumes(c, [
        Volume(name="guest", kind="golden", backend=backend, path="/pool/guest", size=1 << 30),
        Volume(name="blue-1-disk", kind="snapshot", backend=backend, path=disk, size=1 << 30,
               origin="guest", owner="blue-1", **export)])
    if iscsi:
        c = dataclasses.replace(c, credentials=(Credential("blue-1", "blue-1", "s3cret"),))
    return dataclasses.replace(c, vms=tuple(
        dataclasses.replace(vm, volume="blue-1-disk") if vm.name == "blue-1" else vm
        for vm in c.vms))


def test_qemu_domain_with_direct_kernel_boot_is_exactly_this():
    c = cluster(**KERNEL)
    assert domain_xml(c, c.vms[0], "qemu") == QEMU_KERNEL_BOOT


def test_xen_pv_domain_is_exactly_this():
    c = cluster(**KERNEL)
    assert domain_xml(c, c.vms[0], "xen-pv") == XEN_PV_KERNEL_BOOT


def test_kvm_disk_boot_differs_from_qemu_only_in_type_cpu_and_boot():
    text = domain_xml(cluster(), cluster().vms[0], "kvm")
    assert text.startswith('<domain type="kvm">')
    assert KVM_DISK_BOOT_OS in text
    assert '<cpu mode="host-model" />' in text and "qemu64" not in text


def test_rendering_twice_gives_the_same_domain_and_vms_differ():
    c = cluster(**KERNEL)
    assert domain_xml(c, c.vms[0], "qemu") == domain_xml(cluster(**KERNEL), c.vms[0], "qemu")
    second = domain_xml(c, c.vms[1], "qemu")
    assert "<name>blue-2</name>" in second and "ip=::::blue-2:eth0:dhcp" in second
    assert "<disk" not in second  # blue-2 has no volume yet


# Xen PV without a kernel is refused (see below), so it has no XML to check.
@pytest.mark.parametrize("hypervisor,boot,backend", [
    combination for combination in itertools.product(
        ("kvm", "qemu", "xen-pv", "xen-hvm"), ("kernel", "disk"),
        ("qcow2", "reflink", "lvm-thin", "iscsi"))
    if combination[:2] != ("xen-pv", "disk")
    and not (combination[0].startswith("xen") and combination[2] == "iscsi")])
def test_every_rendered_domain_passes_libvirts_schema(tmp_path, hypervisor, boot, backend):
    require("virt-xml-validate", "xmllint")
    c = cluster(backend, **(KERNEL if boot == "kernel" else {}))
    path = tmp_path / "domain.xml"
    path.write_text(domain_xml(c, c.vms[0], hypervisor, initiator_iqn))
    result = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


ISCSI_DISK = """\
    <disk type="network" device="disk">
      <driver name="qemu" type="raw" cache="none" />
      <source protocol="iscsi" name="iqn.2026-11.org.virtualinux:lab.blue-1-disk/1">
        <host name="198.18.0.13" port="3260" />
        <auth username="blue-1">
          <secret type="iscsi" usage="virtualinux:lab:blue-1" />
        </auth>
        <initiator>
          <iqn name="iqn.2026-11.org.virtualinux:lab.blue-1" />
        </initiator>
      </source>
      <target dev="vda" bus="virtio" />
    </disk>
"""


def test_an_exported_disk_is_an_iscsi_source_with_chap_by_secret_and_the_owners_initiator():
    c = cluster("iscsi", **KERNEL)
    text = domain_xml(c, c.vms[0], "qemu", initiator_iqn)
    assert ISCSI_DISK in text
    assert "s3cret" not in text     # the secret's value is libvirt's, never in the XML
    assert text.replace(ISCSI_DISK, "") == QEMU_KERNEL_BOOT.replace(
        QEMU_KERNEL_BOOT[QEMU_KERNEL_BOOT.index("    <disk"):
                         QEMU_KERNEL_BOOT.index("    <interface")], "")


@pytest.mark.parametrize("hypervisor,change,message", [
    ("xen-hvm", None, "Xen guests cannot use directly"),
    ("qemu", "no credential", "blue-1 has no CHAP login"),
    ("qemu", "no initiator", "no initiator name was given"),
])
def test_an_iscsi_disk_that_cannot_log_in_is_one_clear_error(hypervisor, change, message):
    c = cluster("iscsi", **KERNEL)
    if change == "no credential":
        c = dataclasses.replace(c, credentials=())
    with pytest.raises(VlxError, match=message):
        domain_xml(c, c.vms[0], hypervisor, None if change == "no initiator" else initiator_iqn)


def test_xen_pv_without_a_kernel_is_refused():
    with pytest.raises(VlxError, match="Xen PV guest needs a kernel"):
        domain_xml(cluster(), cluster().vms[0], "xen-pv")


def test_node_uri_comes_from_the_template_or_the_node():
    c = cluster()
    assert node_uri(c, c.nodes[0]) == "qemu+tcp://198.18.0.11/system"
    xen = cluster(settings={"hypervisor": "xen-hvm"})
    assert node_uri(xen, xen.nodes[0]) == "xen+tcp://198.18.0.11/system"
    own = dataclasses.replace(c.nodes[0], libvirt_uri="qemu+unix:///system?socket=/r/s")
    assert node_uri(c, own) == "qemu+unix:///system?socket=/r/s"


def test_vxlan_plan_peers_every_hosting_node_with_the_others():
    c = changes.add_node(cluster(), Node(name="node2", mac="52:54:00:00:00:12",
                                         ip=ipaddress.IPv4Address("198.18.0.12"), cpus=4,
                                         memory=2048))
    plans = network.node_plans(c, "blue", ["node1", "node2"])
    assert [(p.node, p.local, p.peers) for p in plans] == [
        ("node1", "198.18.0.11", ("198.18.0.12",)), ("node2", "198.18.0.12", ("198.18.0.11",))]
    assert plans[0].link_requests()[1] == {
        "ifname": "vlxvx100", "kind": "vxlan", "vxlan_id": 100, "vxlan_local": "198.18.0.11",
        "vxlan_port": 4789, "vxlan_learning": 1}


def test_vlan_plan_renders_an_8021q_device_on_the_uplink():
    c = cluster(settings={"vlan_uplink": "bond0"}, vlan=42)
    c = dataclasses.replace(c, vcs=(dataclasses.replace(c.vcs[0], vxlan=None),))
    [plan] = network.node_plans(c, "blue", ["node1"])
    assert plan.link_requests() == [
        {"ifname": "vlxbrv42", "kind": "bridge", "br_forward_delay": 0, "br_stp_state": 0},
        {"ifname": "vlxvl42", "kind": "vlan", "vlan_id": 42, "link_name": "bond0"}]
    assert plan.peers == ()
    assert 'bridge="vlxbrv42"' in domain_xml(c, c.vms[0], "kvm")


XEN_INVENTORY = """
[cluster]
name = "xenlab"
domain = "x.lab"
cidr = "198.18.0.0/24"
gateway_vip = "198.18.0.254"
hypervisor = "xen-pv"
libvirt_uri = "xen:///system"

[[node]]
name = "node1"
mac = "52:54:00:00:00:11"
ip = "198.18.0.11"
cpus = 4
memory = "2GiB"

[[vc]]
name = "blue"
vms = 1
vcpus = 1
memory = "128MiB"
cidr = "198.19.6.0/24"
kernel = "/boot/vmlinuz"
"""


def test_a_hypervisor_that_is_not_there_is_one_line_and_exit_2(db, tmp_path, capsys):
    inventory = tmp_path / "xen.toml"
    inventory.write_text(XEN_INVENTORY)
    assert vlx(capsys, "db", "import", str(inventory))[0] == 0
    generation = db.generation()
    for verb in ("create", "start", "stop", "destroy"):
        code, out, err = vlx(capsys, "vc", verb, "blue")
        assert code == 2, (verb, out, err)
        assert err.startswith("vlx: error: node node1: cannot reach its hypervisor at "
                              "xen:///system: "), err
        assert len(err.strip().splitlines()) == 1
    assert db.generation() == generation
    code, out, _ = vlx(capsys, "vc", "status")
    assert code == 0 and "unreachable" in out


@pytest.mark.parametrize("key,value,message", [
    ("hypervisor", '"vmware"', "choose from auto, kvm, qemu, xen-pv, xen-hvm"),
    ("libvirt_uri", '"qemu+tcp://{address}/system"', "bad URI template"),
    ("libvirt_uri", '"not a uri"', "not a libvirt URI"),
])
def test_bad_hypervisor_settings_are_one_line_and_exit_2(db, tmp_path, capsys, key, value,
                                                         message):
    inventory = tmp_path / "bad.toml"
    inventory.write_text(XEN_INVENTORY.replace(
        'libvirt_uri = "xen:///system"', f"{key} = {value}" if key != "hypervisor"
        else 'libvirt_uri = "xen:///system"').replace(
        'hypervisor = "xen-pv"', f"hypervisor = {value}" if key == "hypervisor"
        else 'hypervisor = "xen-pv"'))
    code, _, err = vlx(capsys, "db", "import", str(inventory))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_auto_hypervisor_is_tcg_where_libvirt_offers_no_kvm():
    silence_libvirt()
    conn = libvirt.open("test:///default")  # its capabilities list no kvm domain type
    try:
        assert hypervisor_of(cluster(), conn) == "qemu"
        assert hypervisor_of(cluster(settings={"hypervisor": "kvm"}), conn) == "kvm"
    finally:
        conn.close()
