"""The lab's parts that need no root: its plan, QEMU's command line, its record, the progress it
reads from logs, and every bad input `vlx lab up` refuses before it makes anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from virtualinux.vm_test import lab, plan, progress, qemu, state
from virtualinux.vm_test.console import follow
from virtualinux.vvcm import Cluster, VlxError, inventory
from virtualinux.vvcm.cli import main

from .conftest import EXAMPLE


def example(text: str | None = None) -> Cluster:
    source = EXAMPLE.read_text() if text is None else text
    return inventory.apply(Cluster(0, None), inventory.parse(source, "test"), "test")


def vlx(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- the plan ---------------------------------------------------------------------------------

def test_replicas_get_free_addresses_from_the_top_of_the_cluster_network(tmp_path):
    layout = plan.plan(example(), tmp_path / "lab")
    assert [str(r.address) for r in layout.replicas] == ["198.18.0.253", "198.18.0.252"]
    assert [r.interface_address for r in layout.replicas] == ["198.18.0.253/24",
                                                               "198.18.0.252/24"]
    assert [p.node.name for p in layout.nodes] == ["node1", "node2", "node3", "node4"]
    assert [p.tap for p in layout.nodes] == ["tap0", "tap1", "tap2", "tap3"]
    macs = {r.mac for r in layout.replicas} | {p.node.mac for p in layout.nodes}
    assert len(macs) == 6
    assert layout.namespaces == (f"{layout.prefix}-net", f"{layout.prefix}-r1",
                                 f"{layout.prefix}-r2")


def test_the_node_image_lab_has_one_bootstrap_and_a_san_at_the_top(tmp_path):
    layout = plan.plan(example(), tmp_path / "lab", 3, image="node")
    assert [(r.name, str(r.address)) for r in layout.replicas] == [("boot", "198.18.0.253")]
    assert layout.bootstrap.namespace == f"{layout.prefix}-boot"
    assert str(layout.san) == "198.18.0.252" and layout.image == "node"
    assert [p.node.name for p in layout.nodes] == ["node1", "node2", "node3"]


def test_nodes_picks_the_first_n_and_refuses_counts_it_cannot_boot(tmp_path):
    assert [p.node.name for p in plan.plan(example(), tmp_path, 2).nodes] == ["node1", "node2"]
    for count in (0, 5, -1):
        with pytest.raises(VlxError, match="between 1 and 4") as err:
            plan.plan(example(), tmp_path, count)
        assert err.value.where == "--nodes"


def test_default_state_dir_has_the_plain_prefix_and_others_a_hashed_one(tmp_path):
    assert plan.namespace_prefix(plan.DEFAULT_STATE_DIR) == "vlxlab"
    one, two = plan.namespace_prefix(tmp_path / "a"), plan.namespace_prefix(tmp_path / "b")
    assert one != two and one.startswith("vlxlab") and len(one) == len("vlxlab") + 6
    assert plan.namespace_prefix(tmp_path / "a") == one


def test_a_cluster_network_outside_the_lab_range_is_refused(tmp_path):
    text = EXAMPLE.read_text().replace("198.18.0.", "10.0.0.")
    with pytest.raises(VlxError, match="outside 198.18.0.0/15"):
        plan.plan(example(text), tmp_path)


def test_no_free_address_for_the_replicas_is_refused(tmp_path):
    # A /29 has 6 hosts: 4 nodes and the gateway leave one, and the lab wants two.
    text = (EXAMPLE.read_text().replace('cidr = "198.18.0.0/24"', 'cidr = "198.18.0.8/29"')
            .replace('gateway_vip = "198.18.0.254"', 'gateway_vip = "198.18.0.9"')
            .replace("198.18.0.14", "198.18.0.10"))
    cluster = example(text)
    assert len(plan.plan(cluster, tmp_path, replica_count=1).replicas) == 1
    with pytest.raises(VlxError, match="no free address for the lab's 2"):
        plan.plan(cluster, tmp_path)


def test_a_node_mac_in_the_replicas_range_is_a_clash(tmp_path):
    text = EXAMPLE.read_text().replace("52:54:00:00:00:14", "02:76:6c:78:00:02")
    with pytest.raises(VlxError, match="replica r2's MAC 02:76:6c:78:00:02 is a node's"):
        plan.plan(example(text), tmp_path)


# --- QEMU -------------------------------------------------------------------------------------

def test_bios_machine_command_line(tmp_path):
    node = example().node("node1")
    machine = qemu.Machine(node, "tap0", tmp_path / "node1")
    assert qemu.command(machine) == [
        "qemu-system-x86_64", "-name", "node1", "-accel", "tcg", "-nodefaults",
        "-no-user-config", "-display", "none", "-smp", "4", "-m", "2048M",
        "-pidfile", f"{tmp_path}/node1/qemu.pid",
        "-machine", "pc", "-boot", "order=n,reboot-timeout=2000",
        "-netdev", "tap,id=net0,ifname=tap0,script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:00:00:11,bootindex=1",
        "-chardev", f"socket,id=serial0,path={tmp_path}/node1/serial.sock,server=on,wait=off,"
                    f"logfile={tmp_path}/node1/serial.log,logappend=on",
        "-serial", "chardev:serial0",
        "-monitor", f"unix:{tmp_path}/node1/monitor.sock,server=on,wait=off"]


LAB_INVENTORY = EXAMPLE.parent / "lab.toml"


def test_the_node_image_lab_gives_the_gateway_pair_an_uplink_nic_and_the_tiny_lab_none(
        tmp_path):
    cluster = example(LAB_INVENTORY.read_text())
    layout = plan.plan(cluster, tmp_path / "lab", 3, image="node")
    uplinks = {p.node.name: (p.uplink_tap, p.uplink_mac) for p in layout.nodes}
    assert uplinks == {"node1": ("up0", "52:54:01:00:00:11"),
                       "node2": ("up1", "52:54:01:00:00:12"), "node3": (None, None)}
    machine = qemu.Machine(cluster.node("node1"), "tap0", tmp_path / "node1", "bios",
                           "up0", "52:54:01:00:00:11")
    cmd = qemu.command(machine)
    # After the boot NIC, at a fixed slot, without a boot ROM: the guest's eth1.
    assert cmd[-4:] == ["-netdev", "tap,id=net1,ifname=up0,script=no,downscript=no",
                        "-device", "virtio-net-pci,netdev=net1,mac=52:54:01:00:00:11,"
                                   "addr=0x10,romfile="]
    assert "net1" not in " ".join(qemu.command(qemu.Machine(cluster.node("node3"), "tap2",
                                                            tmp_path / "node3")))
    assert all(p.uplink_tap is None for p in plan.plan(cluster, tmp_path / "t", 3).nodes)


def test_a_gateway_uplink_the_lab_cannot_name_is_refused(tmp_path):
    text = LAB_INVENTORY.read_text().replace('gateway_uplink = "eth1"', 'gateway_uplink = "ens4"')
    with pytest.raises(VlxError, match='gateway node node1 its uplink as eth1 .* set '
                                       'gateway_uplink = "eth1"'):
        plan.plan(example(text), tmp_path / "lab", 3, image="node")


def test_uefi_machine_gets_q35_ovmf_and_its_own_variable_store(tmp_path):
    machine = qemu.Machine(example().node("node2"), "tap1", tmp_path / "node2", "uefi")
    cmd = qemu.command(machine)
    assert cmd[cmd.index("-machine") + 1] == "q35"
    assert f"if=pflash,format=raw,readonly=on,file={qemu.OVMF_CODE}" in cmd
    assert f"if=pflash,format=raw,file={tmp_path}/node2/OVMF_VARS.fd" in cmd
    assert "-boot" not in cmd
    if qemu.OVMF_VARS.is_file():
        qemu.prepare(machine)
        assert machine.uefi_vars.read_bytes() == qemu.OVMF_VARS.read_bytes()


def fake_meminfo(tmp_path: Path, available_mib: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal: 99999999 kB\nMemAvailable: {available_mib * 1024} kB\n")
    return path


def test_host_checks_name_what_is_missing(tmp_path):
    nodes = list(example().nodes)
    roms = tmp_path / "roms"
    roms.mkdir()
    (roms / qemu.IPXE_ROM).write_bytes(b"\x55\xaa")
    enough = fake_meminfo(tmp_path, 9000)
    qemu.check_host(nodes, "bios", qemu=sys.executable, rom_dir=roms, meminfo=enough)
    with pytest.raises(VlxError, match="qemu-system-nothing is not installed"):
        qemu.check_host(nodes, "bios", qemu="qemu-system-nothing", rom_dir=roms,
                        meminfo=enough)
    with pytest.raises(VlxError, match=r"iPXE ROM .*efi-virtio.rom is missing .*ipxe-qemu"):
        qemu.check_host(nodes, "bios", qemu=sys.executable, rom_dir=tmp_path, meminfo=enough)
    with pytest.raises(VlxError, match="unknown firmware"):
        qemu.check_host(nodes, "coreboot", qemu=sys.executable, rom_dir=roms, meminfo=enough)


def test_more_memory_than_the_host_has_is_refused(tmp_path):
    nodes = list(example().nodes)     # 4 x (2048 + 64) MiB = 8448 MiB
    roms = tmp_path
    (roms / qemu.IPXE_ROM).write_bytes(b"")
    qemu.check_host(nodes, "bios", sys.executable, roms, fake_meminfo(tmp_path, 8448))
    with pytest.raises(VlxError, match="need 8448 MiB .* this host has 8447 MiB"):
        qemu.check_host(nodes, "bios", sys.executable, roms, fake_meminfo(tmp_path, 8447))
    qemu.check_host(nodes[:1], "bios", sys.executable, roms, fake_meminfo(tmp_path, 8447))


# --- the record -------------------------------------------------------------------------------

def test_record_round_trips_and_names_the_live_process(tmp_path):
    record = state.LabRecord(state_dir=tmp_path, prefix="vlxlabtest", started=1.5,
                             nodes={"node1": {"mac": "52:54:00:00:00:11", "ip": "198.18.0.11"}})
    record.save()
    record.add_namespace("vlxlabtest-net")
    entry = record.add_process("qemu-node1", "vlxlabtest-net")
    assert state.LabRecord.load(tmp_path).processes[0].pid is None
    entry.pid, entry.start_time = os.getpid(), state.process_start_time(os.getpid())
    record.save()
    again = state.LabRecord.load(tmp_path)
    assert again.namespaces == ["vlxlabtest-net"]
    assert again.nodes == record.nodes
    assert state.same_process(again.process("qemu-node1"))
    # The same pid with another start time is another process: down must not signal it.
    again.processes[0].start_time += 1
    assert not state.same_process(again.processes[0])
    assert not list(tmp_path.glob("*.new"))


def test_a_damaged_record_is_reported_not_guessed(tmp_path):
    assert state.LabRecord.load(tmp_path) is None
    (tmp_path / state.RECORD).write_text('{"format": 1, "prefix": "x"')
    with pytest.raises(state.StateError, match="cannot read"):
        state.LabRecord.load(tmp_path)
    (tmp_path / state.RECORD).write_text('{"format": 1, "prefix": "x"}')
    with pytest.raises(state.StateError, match="damaged"):
        state.LabRecord.load(tmp_path)


def test_a_dead_process_is_not_the_same_process():
    proc = subprocess.Popen(["true"])
    start = state.process_start_time(proc.pid)
    proc.wait()
    assert start is not None
    assert not state.same_process(state.ProcessEntry("x", "ns", proc.pid, start))
    assert not state.same_process(state.ProcessEntry("x", "ns", None, None))


def test_up_twice_or_into_a_foreign_directory_is_refused(tmp_path):
    state.LabRecord(state_dir=tmp_path, prefix="vlxlabnone0", started=time.time()).save()
    with pytest.raises(VlxError, match="a lab is up already"):
        lab.check_not_running(tmp_path, "vlxlabnone0")
    (tmp_path / state.RECORD).unlink()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(VlxError, match="holds files but no lab record"):
        lab.check_not_running(tmp_path, "vlxlabnone0")
    (tmp_path / "notes.txt").unlink()
    lab.check_not_running(tmp_path, "vlxlabnone0")


# --- progress ---------------------------------------------------------------------------------

def test_progress_follows_replica_and_serial_logs_in_order(tmp_path):
    nodes = [progress.NodeProgress("node1", "52:54:00:00:00:11", "198.18.0.11"),
             progress.NodeProgress("node10", "52:54:00:00:00:1a", "198.18.0.1")]
    r1, serial = tmp_path / "r1.log", tmp_path / "node1.serial"
    answering = {"198.18.0.11"}
    now = [100.0]
    watcher = progress.Watcher(nodes, {"node1": serial, "node10": tmp_path / "none"}, [r1],
                               ping=lambda ip: ip in answering, clock=lambda: now[0])
    watcher.power_on("node1", 99.0)
    assert watcher.poll() == []
    r1.write_text("14:24:03 dhcp DHCPOFFER 52:54:00:00:00:11 -> 198.18.0.11 node1 (gen 1)\n"
                  "14:24:06 dhcp DHCPACK 52:54:00:00:00:11 -> 198.18.0.11 node1 (gen 1)\n"
                  "14:24:07 http GET /boot.ipxe 200 668 bytes to 198.18.0.11 (gen 1)\n")
    now[0] = 101.0
    assert [(n.name, p) for n, p in watcher.poll()] == [("node1", "dhcp"), ("node1", "files")]
    # 198.18.0.1 (node10) is a prefix of 198.18.0.11: node10 has fetched nothing.
    assert watcher.nodes["node10"].phase == "off"
    with open(serial, "w") as file:
        file.write("[    0.000000] Linux version 6.1.0\r\nvirtualinux: node no")
    now[0] = 102.0
    assert [(n.name, p) for n, p in watcher.poll()] == [("node1", "kernel")]
    with open(serial, "a") as file:
        file.write("de1 up 198.18.0.11\r\n/ # ")
    now[0] = 103.0
    assert [(n.name, p) for n, p in watcher.poll()] == [("node1", "init"), ("node1", "ready")]
    assert watcher.nodes["node1"].seen == {"powered": 99.0, "dhcp": 101.0, "files": 101.0,
                                           "kernel": 102.0, "init": 103.0, "ready": 103.0}
    assert not watcher.all_at("ready")
    # A phase never goes back: a second DHCP after a reboot leaves the node where it was.
    with open(r1, "a") as file:
        file.write("DHCPACK 52:54:00:00:00:11 -> 198.18.0.11 node1 (gen 1)\n")
    assert watcher.poll() == [] and watcher.nodes["node1"].phase == "ready"


def test_a_node_up_on_another_address_is_never_ready(tmp_path):
    serial = tmp_path / "serial"
    serial.write_text("virtualinux: node node1 up 198.18.0.99\n")
    node = progress.NodeProgress("node1", "52:54:00:00:00:11", "198.18.0.11")
    watcher = progress.Watcher([node], {"node1": serial}, [], ping=lambda ip: True)
    assert [p for _, p in watcher.poll()] == ["init"]
    assert node.describe() == "init on 198.18.0.99, not 198.18.0.11"
    assert watcher.poll() == [] and node.phase == "init"


def test_a_node_image_boot_is_followed_through_iscsi_root_each_step_and_serving(tmp_path):
    """Console lines as the node image prints them (open-iscsi's login, the kernel's ext4
    mount, one line per start-up step); serving once its replica answers after the last."""
    serial = tmp_path / "serial"
    serial.write_text(
        "iscsistart: Connection1:0 to [target: iqn.x:node1-root, portal: 198.18.0.252,3260] "
        "through [iface: default] is operational now\r\n"
        "[   40.1] EXT4-fs (sda): mounted filesystem with ordered data mode.\r\n"
        "[  139.2] python[263]: virtualinux: [10 identity] ok: node1 198.18.0.11\r\n"
        "[  141.0] python[263]: virtualinux: [20 time] FAILED: chrony.service: no such unit\r\n")
    node = progress.NodeProgress("node1", "52:54:00:00:00:11", "198.18.0.11",
                                 phases=progress.node_phases(["identity", "time", "bootsvc"]))
    answering = []
    watcher = progress.Watcher([node], {"node1": serial}, [],
                               serving=lambda ip: answering.append(ip) or True)
    assert [p for _, p in watcher.poll()] == ["iscsi", "root", "identity", "time"]
    assert node.describe() == "time (time FAILED)" and answering == []
    with open(serial, "a") as log:
        log.write("virtualinux: [12 bootsvc] ok: replica dhcp,tftp,http on eth0\n")
    assert [p for _, p in watcher.poll()] == ["bootsvc", "serving"]
    assert answering == ["198.18.0.11"] and watcher.all_at("serving")


def test_a_node_serves_only_once_every_step_has_said_so_in_any_order(tmp_path):
    """The database step runs in a thread: its line may come after the last step's, and a
    node is not "serving" before it (the lab's `up` once returned without it)."""
    serial = tmp_path / "serial"
    serial.write_text(
        "[   40.1] EXT4-fs (sda): mounted filesystem with ordered data mode.\n"
        "virtualinux: [10 identity] ok: node1 198.18.0.11\n"
        "virtualinux: [12 bootsvc] ok: replica dhcp,tftp,http on eth0\n"
        "virtualinux: [60 libvirtd] ok: libvirtd host UUID x\n")
    node = progress.NodeProgress("node1", "52:54:00:00:00:11", "198.18.0.11",
                                 phases=progress.node_phases(
                                     ["identity", "bootsvc", "database", "libvirtd"]))
    probed = []
    watcher = progress.Watcher([node], {"node1": serial}, [],
                               serving=lambda ip: probed.append(ip) or True)
    assert [p for _, p in watcher.poll()] == ["root", "identity", "bootsvc", "libvirtd"]
    assert probed == [] and not node.steps_done
    with open(serial, "a") as log:
        log.write("virtualinux: [30 database] ok: etcd member node1 joins\n")
    assert [p for _, p in watcher.poll()] == ["serving"]
    assert watcher.poll() == [] and probed == ["198.18.0.11"]


def test_console_follow_copies_the_log_and_what_is_appended(tmp_path):
    log = tmp_path / "serial.log"
    log.write_bytes(b"SeaBIOS\r\n")
    out = tmp_path / "out"
    calls = []

    def stop() -> bool:
        calls.append(1)
        if len(calls) == 1:
            with open(log, "ab") as file:
                file.write(b"virtualinux: node node1 up 198.18.0.11\n")
        return len(calls) > 2

    with open(out, "wb") as sink:
        follow(log, sink, stop=stop, interval=0.01)
    assert out.read_bytes() == b"SeaBIOS\r\nvirtualinux: node node1 up 198.18.0.11\n"


# --- the command line, refusing before anything is made ---------------------------------------

def nothing_made(state_dir: Path) -> None:
    assert not state_dir.exists()
    assert lab.lab_namespaces(plan.namespace_prefix(state_dir)) == []


def test_up_with_a_mac_clash_is_refused_and_makes_nothing(tmp_path, capsys):
    bad = tmp_path / "clash.toml"
    bad.write_text(EXAMPLE.read_text().replace("52:54:00:00:00:12", "52:54:00:00:00:11"))
    code, _, err = vlx(capsys, "lab", "up", "--image", "tiny", "--inventory", str(bad),
                       "--state-dir", str(tmp_path / "lab"))
    assert code == 2
    assert "duplicate MAC 52:54:00:00:00:11" in err
    nothing_made(tmp_path / "lab")


def test_up_needing_more_memory_than_the_host_has_is_refused(tmp_path, capsys):
    bad = tmp_path / "big.toml"
    bad.write_text(EXAMPLE.read_text().replace('memory = "2GiB"', 'memory = "4096GiB"'))
    code, _, err = vlx(capsys, "lab", "up", "--image", "tiny",
                       "--inventory", str(bad), "--nodes", "1",
                       "--state-dir", str(tmp_path / "lab"))
    assert code == 2
    assert "the nodes need 4194368 MiB" in err and "boot fewer with --nodes" in err
    nothing_made(tmp_path / "lab")


def test_up_without_qemu_is_refused_and_makes_nothing(tmp_path):
    # A PATH holding every program the lab needs but QEMU.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in lab.REQUIRED_PROGRAMS:
        found = subprocess.run(["sh", "-c", f"command -v {program}"], capture_output=True,
                               text=True).stdout.strip()
        (bin_dir / program).symlink_to(found)
    done = subprocess.run([sys.executable, "-c", "import sys; from virtualinux.vvcm.cli "
                           "import main; sys.exit(main())", "lab", "up", "--image", "tiny",
                                                  "--inventory",
                           str(EXAMPLE), "--state-dir", str(tmp_path / "lab")],
                          env={**os.environ, "PATH": str(bin_dir)}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)" in done.stderr
    nothing_made(tmp_path / "lab")


def test_up_when_a_lab_is_up_already_is_refused_and_keeps_it(tmp_path, capsys):
    record = state.LabRecord(state_dir=tmp_path, prefix=plan.namespace_prefix(tmp_path),
                             started=time.time())
    record.save()
    before = (tmp_path / state.RECORD).read_bytes()
    code, _, err = vlx(capsys, "lab", "up", "--image", "tiny", "--inventory", str(EXAMPLE),
                       "--state-dir", str(tmp_path))
    assert code == 2
    assert "a lab is up already" in err and "vlx lab down" in err
    assert (tmp_path / state.RECORD).read_bytes() == before


def test_status_console_and_down_without_a_lab(tmp_path, capsys):
    code, _, err = vlx(capsys, "lab", "status", "--state-dir", str(tmp_path / "none"))
    assert code == 2 and "no lab in" in err
    code, _, err = vlx(capsys, "lab", "console", "node1", "--state-dir", str(tmp_path / "none"))
    assert code == 2 and "no lab in" in err
    code, out, _ = vlx(capsys, "lab", "down", "--state-dir", str(tmp_path / "none"))
    assert code == 0 and "nothing to remove" in out


def test_status_reports_a_lab_whose_processes_are_gone(tmp_path, capsys):
    record = state.LabRecord(
        state_dir=tmp_path, prefix="vlxlabgone00", phase="up", started=time.time(),
        nodes={"node1": {"mac": "52:54:00:00:00:11", "ip": "198.18.0.11", "tap": "tap0",
                         "seen": {"powered": 0.0, "init": 21.5}}},
        replicas={"r1": {"namespace": "vlxlabgone00-r1", "address": "198.18.0.253",
                         "mac": "02:76:6c:78:00:01"}})
    record.processes.append(state.ProcessEntry("qemu-node1", "vlxlabgone00-net", 2**22 + 7, 1))
    record.save()
    (tmp_path / "nodes" / "node1").mkdir(parents=True)
    (tmp_path / "nodes" / "node1" / "serial.log").write_text(
        "virtualinux: node node1 up 198.18.0.11\n")
    code, out, _ = vlx(capsys, "lab", "status", "--state-dir", str(tmp_path), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["nodes"][0]["phase"] == "off"     # its QEMU is gone
    assert report["nodes"][0]["seen"]["init"] == 21.5
    assert report["replicas"][0]["state"] == "dead"
    code, out, _ = vlx(capsys, "lab", "console", "node1", "--no-follow",
                       "--state-dir", str(tmp_path))
    assert code == 0
    code, _, err = vlx(capsys, "lab", "console", "node9", "--state-dir", str(tmp_path))
    assert code == 2 and "no node 'node9' in this lab (it has node1)" in err


def test_progress_display_prints_a_line_per_step_when_not_a_terminal():
    import io

    from virtualinux.vvcm.cli.lab import ProgressDisplay
    out = io.StringIO()
    display = ProgressDisplay(["node1", "node10"], out)
    node = progress.NodeProgress("node10", "52:54:00:00:00:1a", "198.18.0.10", phase="dhcp")
    display.show(node, "dhcp", 5.25)
    node.phase, node.reported_ip = "init", "198.18.0.99"
    display.show(node, "init", 20.0)
    assert out.getvalue().splitlines() == [
        "    5.2s  node10  dhcp",
        "   20.0s  node10  init on 198.18.0.99, not 198.18.0.10"]


def test_ssh_and_power_on_without_a_node_image_lab_are_refused_in_one_line(tmp_path, capsys):
    for argv in (("ssh", "node1", "hostname"), ("power-on", "node4")):
        code, _, err = vlx(capsys, "lab", argv[0], "--state-dir", str(tmp_path / "none"),
                           *argv[1:])
        assert code == 2 and f"no node-image lab in {tmp_path / 'none'}" in err, err
        assert err.count("\n") == 1, err


def test_the_lab_admin_key_is_made_once_and_ssh_reads_it(tmp_path):
    from virtualinux.vm_test import admin_key as admin
    from virtualinux.vvcm.fields import parse_ssh_public_key
    public = admin.admin_public_key(tmp_path)
    assert parse_ssh_public_key(public) == public and public.endswith(" vlx-lab-admin")
    assert admin.admin_public_key(tmp_path) == public
    private = admin.key_path(tmp_path)
    assert private.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "admin").stat().st_mode & 0o777 == 0o700
    # ssh-keygen derives the same public key from the private file ssh -i will read.
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], capture_output=True,
                             text=True, check=True).stdout.split()
    assert derived[:2] == public.split()[:2]
