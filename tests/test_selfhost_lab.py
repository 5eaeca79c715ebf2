"""The lab cluster boots itself: `vlx lab up` boots the real node image on three QEMU nodes from
a bootstrap (one replica, the first etcd member) and a lab SAN; each node joins the database
and serves; the bootstrap goes; a node that is reset then boots again from the others alone
and comes back as the same etcd member, its own writes kept in its own snapshot; a node is
SIGKILLed while another reboots, and the reboot still completes.

The scenarios run in order on one lab (each node-image boot takes minutes in TCG: one lab for
the module keeps the file to 13-20 minutes in TCG). Every wait is on an event (a console line,
the lab's status, an answer); the time limits are only safety nets.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from virtualinux.image.build import build_image, image_spec
from virtualinux.netboot import scripts
from virtualinux.vm_test import admin
from virtualinux.vm_test import lab as labs
from virtualinux.vm_test.netns import NETNS_DIR, Namespace
from virtualinux.vm_test.plan import namespace_prefix
from virtualinux.vm_test.wait import wait_for
from virtualinux.vvcm import Database, host_keys
from virtualinux.vvcm.command import vlx_command

from .conftest import require

pytestmark = pytest.mark.lab

VLX = vlx_command()
INVENTORY = Path(__file__).resolve().parent.parent / "examples" / "lab.toml"
NODES = ("node1", "node2", "node3")
ADDRESS = {"node1": "198.18.0.11", "node2": "198.18.0.12", "node3": "198.18.0.13"}
# In the database but never powered on: the DHCP probes ask for its address.
PROBE_MAC, PROBE_IP = "52:54:00:00:00:14", "198.18.0.14"
UP_TIMEOUT = 1500           # three TCG nodes at once on a loaded 2-core machine
REBOOT_TIMEOUT = 900
# A node's start-up is done when its last step has said so; the database step runs in a thread
# beside the others, so its line may come after that one.
LAST_STEP = r"\[60 libvirtd\] ok"
DATABASE_STEP = r"\[30 database\] \w+"


class SelfHostedLab:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.boot = Namespace(f"{namespace_prefix(state_dir)}-boot")

    def vlx(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*VLX, *argv, "--state-dir", str(self.state_dir)],
                              capture_output=True, text=True, timeout=timeout)

    def status(self) -> dict:
        done = self.vlx("lab", "status", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def serial(self, node: str) -> Path:
        return self.state_dir / "nodes" / node / "serial.log"

    def console_since(self, node: str, offset: int) -> str:
        with open(self.serial(node), "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def wait_console(self, node: str, pattern: str, offset: int, timeout: float) -> str:
        found = re.compile(pattern)
        wait_for(lambda: found.search(self.console_since(node, offset)), timeout,
                 f"{node}'s console to show {pattern!r}", interval=1.0)
        return self.console_since(node, offset)

    def answers_http(self, ip: str) -> bool:
        done = self.boot.run(["curl", "-sf", "-m", "3", "-o", "/dev/null",
                              f"http://{ip}/boot.ipxe"], check=False)
        return done.returncode == 0

    def tftp(self, ip: str, name: str, out: Path) -> bytes:
        out.unlink(missing_ok=True)
        self.boot.run(["tftp", "-m", "binary", ip, "-c", "get", name, str(out)], timeout=30)
        return out.read_bytes()

    def members(self) -> list[dict]:
        return self.status()["members"]

    def reset(self, node: str) -> int:
        """A hard reset through the QEMU monitor (the power button); the console offset
        from which the new boot shows."""
        offset = self.serial(node).stat().st_size
        with socket.socket(socket.AF_UNIX) as monitor:
            monitor.settimeout(30)
            monitor.connect(str(self.state_dir / "nodes" / node / "monitor.sock"))
            # The monitor takes a command only after its prompt, and has run it once it
            # prompts again (a command sent earlier and the socket closed is lost).
            for command in (b"", b"system_reset\n"):
                monitor.sendall(command)
                said = b""
                while b"(qemu) " not in said:
                    said += monitor.recv(4096) or b"(qemu) "
        return offset


# Sends one DISCOVER with secs 10 (past dhcp_fallback_secs: every replica answers) from
# the probe MAC and prints the server ids of the OFFERs, once all of argv[2:] have answered.
DHCP_PROBE = """
import sys, time
from scapy.all import AsyncSniffer, BOOTP, DHCP, IP, UDP, Ether, conf, sendp
conf.verb = 0
mac, wanted = sys.argv[1], set(sys.argv[2:])
seen, offered = set(), set()
def take(packet):
    if BOOTP in packet and packet[BOOTP].xid == 0x5E1F and packet[BOOTP].op == 2:
        options = {o[0]: o[1] for o in packet[DHCP].options if isinstance(o, tuple)}
        seen.add(options.get("server_id"))
        offered.add(packet[BOOTP].yiaddr)
sniffer = AsyncSniffer(iface="eth0", filter="udp and dst port 68", prn=take, store=False)
sniffer.start()
time.sleep(1)
chaddr = bytes.fromhex(mac.replace(":", ""))
deadline = time.monotonic() + 60
while not wanted <= seen and time.monotonic() < deadline:
    sendp(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
          / UDP(sport=68, dport=67) / BOOTP(chaddr=chaddr, xid=0x5E1F, secs=10, flags=0x8000)
          / DHCP(options=[("message-type", "discover"), "end"]), iface="eth0")
    time.sleep(3)
sniffer.stop()
print(" ".join(sorted(seen)), "|", " ".join(sorted(offered)))
"""

# One NTP client request (mode 3); prints the mode and stratum of the answer, if any.
NTP_PROBE = """
import sys
from scapy.all import IP, NTP, UDP, conf, sr1
conf.verb = 0
answer = sr1(IP(dst=sys.argv[1]) / UDP(sport=40123, dport=123) / NTP(version=4, mode=3),
             timeout=5, retry=3)
print("none" if answer is None or NTP not in answer else
      f"mode {answer[NTP].mode} stratum {answer[NTP].stratum}")
"""


# Listens on the cluster segment for VRRP adverts (only the master sends them) and asks who
# holds the VIP by ARP; prints {"adverts": [[source, vrid, priority], ...], "vip_mac": MAC}.
GATEWAY_PROBE = """
import json, sys
from scapy.all import ARP, IP, Ether, conf, sniff, srp1
from scapy.layers.vrrp import VRRPv3
conf.verb = 0
vip, seconds = sys.argv[1], float(sys.argv[2])
seen = sniff(iface="eth0", filter="ip proto 112", timeout=seconds)
adverts = sorted({(p[IP].src, p[VRRPv3].vrid, p[VRRPv3].priority) for p in seen
                  if VRRPv3 in p and vip in p[VRRPv3].addrlist})
answer = srp1(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=vip), iface="eth0", timeout=3, retry=3)
print(json.dumps({"adverts": adverts, "vip_mac": answer[ARP].hwsrc if answer else None}))
"""

# Asks for the VIP by ARP every 0.1 s until the MAC argv[2] answers for it (or announces it:
# a gratuitous ARP); prints "ready" first, then the wall-clock time it saw that, or "none".
TAKEOVER_PROBE = """
import sys, time
from scapy.all import ARP, AsyncSniffer, Ether, conf
conf.verb = 0
vip, mac, limit = sys.argv[1], sys.argv[2].lower(), float(sys.argv[3])
seen = []
def take(packet):
    if ARP in packet and packet[ARP].psrc == vip and packet[ARP].hwsrc.lower() == mac:
        seen.append(time.time())
sniffer = AsyncSniffer(iface="eth0", filter="arp", prn=take, store=False)
sniffer.start()
time.sleep(1)
sock = conf.L2socket(iface="eth0")
request = Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=vip)
print("ready", flush=True)
deadline = time.monotonic() + limit
while not seen and time.monotonic() < deadline:
    sock.send(request)
    time.sleep(0.1)
sniffer.stop()
print(f"{seen[0]:.3f}" if seen else "none", flush=True)
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    require("qemu-system-x86_64", "tgtd", "tgtadm", "etcd", "etcdctl", "curl", "tftp",
            "mkfs.btrfs")
    build_image(image_spec("node"))      # cached; built before any boot is timed
    state_dir = tmp_path_factory.mktemp("selfhost") / "lab"
    running = SelfHostedLab(state_dir)
    try:
        yield running
    finally:
        down = running.vlx("lab", "down", timeout=120)
        prefix = namespace_prefix(state_dir)
        left = [entry.name for entry in NETNS_DIR.iterdir() if entry.name.startswith(prefix)] \
            if NETNS_DIR.is_dir() else []
        mounted = str(state_dir) in Path("/proc/mounts").read_text()
        assert down.returncode == 0 and not left and not mounted, (down.stdout, down.stderr,
                                                                   left)


def test_three_nodes_boot_the_node_image_from_the_bootstrap_and_each_serves(lab, tmp_path):
    started = time.monotonic()
    up = lab.vlx("lab", "up", "--inventory", str(INVENTORY), "--nodes", "3",
                 "--timeout", str(UP_TIMEOUT), timeout=UP_TIMEOUT + 600)
    print(up.stdout, up.stderr, f"up took {time.monotonic() - started:.0f} s", sep="\n")
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    # `lab status` probes each node's replica once per call: a TCG guest under load may miss
    # one probe, so wait for a status in which all three answer.
    wait_for(lambda: {node["name"]: node["phase"] for node in lab.status()["nodes"]} ==
             dict.fromkeys(NODES, "serving"), 120, "every node serving in lab status",
             interval=2)
    status = lab.status()
    answering = {replica["name"]: replica["answers"] for replica in status["replicas"]}
    assert answering == {"boot": "yes", "node1": "yes", "node2": "yes", "node3": "yes"}
    for node in NODES:
        console = lab.console_since(node, 0)
        assert f"{node} login:" in console or "[60 libvirtd] ok" in console
        assert re.search(rf"\[30 database\] ok: etcd member {node} on {ADDRESS[node]} joins "
                         "the running members", console), console[-2000:]
        # Its root came over iSCSI: the disk attached, and the identity step read the node's
        # own initiator name from the running session (its snapshot's ACL admits only that).
        assert "[sda] Attached SCSI disk" in console
        assert re.search(rf"\[10 identity\] ok: {node} .*initiator iqn\.\S+[:.]{node}\b",
                         console), console[-2000:]
    wait_for(lambda: {m["name"]: m["healthy"] for m in lab.members()} ==
             {"bootstrap": True, "node1": True, "node2": True, "node3": True}, 120,
             "the bootstrap and the three nodes to be healthy etcd members", interval=2)
    # TFTP: every node's replica hands out the same boot script.
    for node in NODES:
        assert lab.tftp(ADDRESS[node], "boot.ipxe", tmp_path / f"{node}.ipxe") == \
            scripts.boot_script().encode()
    # DHCP: every node's replica offers the probe machine its address from the database.
    script = tmp_path / "dhcp_probe.py"
    script.write_text(DHCP_PROBE)
    done = lab.boot.run([sys.executable, str(script), PROBE_MAC, *ADDRESS.values()],
                        timeout=120)
    servers, offered = (part.split() for part in done.stdout.strip().split("|"))
    assert set(ADDRESS.values()) <= set(servers), done.stdout
    assert offered == [PROBE_IP]
    # NTP: every node's chrony answers (as a server, mode 4).
    ntp = tmp_path / "ntp_probe.py"
    ntp.write_text(NTP_PROBE)
    for node in NODES:
        said = lab.boot.run([sys.executable, str(ntp), ADDRESS[node]], timeout=60).stdout
        assert said.startswith("mode 4 "), f"{node}: {said}"


def test_bootstrap_removed_the_nodes_hold_the_database_and_hand_out_their_own_url(lab):
    removed = lab.vlx("lab", "bootstrap", "remove")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert "removed member bootstrap" in removed.stdout
    status = lab.status()
    assert {r["name"]: r["state"] for r in status["replicas"]}["boot"] == "dead"
    wait_for(lambda: {m["name"]: m["healthy"] for m in lab.members()} ==
             {"node1": True, "node2": True, "node3": True}, 120,
             "the three nodes to be the healthy etcd members", interval=2)
    nodes_only = "etcd://" + ",".join(f"{ip}:2379" for ip in ADDRESS.values())
    # The nodes' replicas follow the change: node2's script names only the nodes' members.
    wait_for(lambda: f"vlx.store={nodes_only} " in lab.boot.run(
        ["curl", "-sf", "-m", "3", f"http://{ADDRESS['node1']}/nodes/52-54-00-00-00-12.ipxe"],
        check=False).stdout, 120, "node1 to hand out the store URL without the bootstrap")


VIP = "198.18.0.254"
CLIENT = "198.18.0.200/24"          # a lab namespace on the cluster network, no node's
MAC = {"node1": "52:54:00:00:00:11", "node2": "52:54:00:00:00:12"}
WORLD_PING, WORLD_DNS, WORLD_NTP = "198.18.1.1", "198.18.1.53", "198.18.1.123"
VRID = 51


def _client(lab: SelfHostedLab, netns) -> Namespace:
    """A namespace on the lab's cluster segment whose way out is the gateway VIP."""
    client = netns.namespace("client")
    netns.plug(Namespace(f"{namespace_prefix(lab.state_dir)}-net"), "br0", client,
               address=CLIENT)
    client.default_route(VIP)
    return client


def _gateway(client: Namespace, tmp_path: Path, seconds: float = 8) -> dict:
    script = tmp_path / "gateway_probe.py"
    script.write_text(GATEWAY_PROBE)
    done = client.run([sys.executable, str(script), VIP, str(seconds)], timeout=120)
    return json.loads(done.stdout)


def _world_answers(client: Namespace) -> bool:
    return client.run(["ping", "-c", "1", "-W", "2", WORLD_PING], check=False).returncode == 0


def test_the_gateway_pair_runs_on_node1_and_node2_and_the_world_answers_through_the_vip(
        lab, netns, tmp_path):
    require("ping", "dig")
    for node, address in (("node1", "198.18.1.254/24"), ("node2", "198.18.1.253/24")):
        console = lab.console_since(node, 0)
        # The start-up put the database's address on the second NIC, and the replica runs
        # the heartbeat (as root: it holds the VIP, sends raw VRRP and sets up the NAT).
        assert f"[45 uplink] ok: eth1 up with {address}" in console, console[-3000:]
        assert re.search(r"\[12 bootsvc\] ok: replica \S*heartbeat", console), console[-3000:]
    assert "[45 uplink] ok: not a gateway node" in lab.console_since("node3", 0)
    assert not re.search(r"\[12 bootsvc\] ok: replica \S*heartbeat",
                         lab.console_since("node3", 0))
    client = _client(lab, netns)
    # node1 (gateway-primary, priority 200) is master: the only one advertising, and the VIP
    # is at its MAC; node2 (backup) is silent.
    wait_for(lambda: _gateway(client, tmp_path) ==
             {"adverts": [[ADDRESS["node1"], VRID, 200]], "vip_mac": MAC["node1"]}, 300,
             "node1 to be the gateway master and hold the VIP", interval=2)
    # The world (no route to the cluster network) answers through the VIP and node1's NAT.
    wait_for(lambda: _world_answers(client), 120, f"{WORLD_PING} through the VIP")
    name = "ping.world.test"
    said = client.run(["dig", "+short", "+time=3", "+tries=2", f"@{WORLD_DNS}", name],
                      check=False).stdout.split()
    assert said == [WORLD_PING]
    # node3's DNS replica forwards a world name to upstream_dns, its way out the VIP too.
    wait_for(lambda: client.run(["dig", "+short", "+time=3", "+tries=1", f"@{ADDRESS['node3']}",
                                 name], check=False).stdout.split() == [WORLD_PING], 120,
             f"{name} through node3's DNS and the VIP")
    ntp = tmp_path / "ntp_probe.py"
    ntp.write_text(NTP_PROBE)
    said = client.run([sys.executable, str(ntp), WORLD_NTP], timeout=60).stdout
    assert said.startswith("mode 4 stratum 8"), said


def test_the_gateway_backup_takes_over_when_the_primary_dies_and_gives_it_back(
        lab, netns, tmp_path):
    client = _client(lab, netns)
    wait_for(lambda: _gateway(client, tmp_path)["vip_mac"] == MAC["node1"], 300,
             "node1 to hold the VIP")
    assert _world_answers(client)
    script = tmp_path / "takeover_probe.py"
    script.write_text(TAKEOVER_PROBE)
    probe = client.popen([sys.executable, str(script), VIP, MAC["node2"], "120"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert probe.stdout.readline().strip() == "ready"
        node1 = [n for n in lab.status()["nodes"] if n["name"] == "node1"][0]
        killed = time.time()
        os.kill(node1["qemu_pid"], signal.SIGKILL)
        seen = probe.stdout.readline().strip()
    finally:
        probe.kill()
        probe.wait(10)
    assert seen != "none", "node2 never answered for the VIP"
    wait_for(lambda: _world_answers(client), 120, f"{WORLD_PING} through node2")
    answered = time.time()
    print(f"node1 killed; node2 holds the VIP {float(seen) - killed:.2f} s later, the world "
          f"answers again {answered - killed:.1f} s after the kill; load average "
          f"{os.getloadavg()}")
    # node2 is master now, advertising its backup priority.
    assert _gateway(client, tmp_path) == {"adverts": [[ADDRESS["node2"], VRID, 100]],
                                          "vip_mac": MAC["node2"]}
    # node1 powered on again boots from node2's and node3's replicas and, once its heartbeat
    # runs, preempts: the VIP is back at its MAC and the world answers through it.
    offset = lab.serial("node1").stat().st_size
    labs.power_on(lab.state_dir, "node1")
    console = lab.wait_console("node1", LAST_STEP, offset, REBOOT_TIMEOUT)
    assert "[45 uplink] ok: eth1 up with 198.18.1.254/24" in console
    wait_for(lambda: _gateway(client, tmp_path) ==
             {"adverts": [[ADDRESS["node1"], VRID, 200]], "vip_mac": MAC["node1"]}, 300,
             "node1 to take the VIP back (preemption)", interval=2)
    print(f"node1 master again {time.time() - killed:.0f} s after its kill; load average "
          f"{os.getloadavg()}")
    wait_for(lambda: _world_answers(client), 120, f"{WORLD_PING} through node1 again")
    # The later scenarios start from three healthy members.
    wait_for(lambda: {m["name"]: m["healthy"] for m in lab.members()} ==
             {"node1": True, "node2": True, "node3": True}, 300,
             "node1 to be a healthy member again", interval=2)


def test_a_reset_node_boots_again_served_only_by_the_other_nodes(lab):
    status = lab.status()
    bootstrap = [p for p in status["replicas"] if p["name"] == "boot"][0]
    assert bootstrap["pid"] is None and bootstrap["answers"] == "no"
    offset = lab.reset("node2")
    lab.wait_console("node2", LAST_STEP, offset, REBOOT_TIMEOUT)
    console = lab.wait_console("node2", DATABASE_STEP, offset, REBOOT_TIMEOUT)
    # Its etcd data survived on its own snapshot: it restarts as the same member.
    assert "[30 database] ok: etcd member node2 on 198.18.0.12 restarts as itself" in console
    assert "vlx.store=etcd://198.18.0.11:2379,198.18.0.12:2379,198.18.0.13:2379 " in console
    wait_for(lambda: lab.answers_http(ADDRESS["node2"]), 300, "node2's replica to serve")
    wait_for(lambda: {m["name"]: m["healthy"] for m in lab.members()} ==
             {"node1": True, "node2": True, "node3": True}, 300,
             "node2 to be a healthy member again", interval=2)


def _mounted_copy(volume_path: str, where: Path) -> Path:
    """A reflink copy of a volume (the pool is btrfs), mounted: the running node's file
    system as a crash would leave it, its journal replayed on the copy, not on the node's."""
    copy = Path(volume_path).with_name(f"check-{where.name}.img")
    subprocess.run(["cp", "--reflink=always", volume_path, str(copy)], check=True)
    where.mkdir()
    subprocess.run(["mount", "-o", "loop", str(copy), str(where)], check=True)
    return copy


def test_what_a_node_writes_stays_in_its_own_snapshot(lab, tmp_path):
    cluster = Database(lab.state_dir / "cluster.db").load()
    paths = {"golden": cluster.volume("node-golden").path,
             **{node: cluster.volume(f"{node}-root").path for node in ("node1", "node2")}}
    copies, mounts = [], []
    try:
        for name, path in paths.items():
            mount = tmp_path / name
            copies.append(_mounted_copy(path, mount))
            mounts.append(mount)
        golden, node1, node2 = mounts
        # node2 wrote its name and its etcd member's data (and kept them through its reset);
        # neither node1 nor the golden volume sees them.
        assert (node2 / "etc/hostname").read_text() == "node2\n"
        assert (node1 / "etc/hostname").read_text() == "node1\n"
        assert not (golden / "etc/hostname").exists()
        assert (node2 / "var/lib/virtualinux/etcd/node2/member").is_dir()
        assert not (node1 / "var/lib/virtualinux/etcd/node2").exists()
        assert not (golden / "var/lib/virtualinux/etcd").exists() or \
            not any((golden / "var/lib/virtualinux/etcd").iterdir())
    finally:
        for mount in mounts:
            subprocess.run(["umount", str(mount)], check=False)
        for copy in copies:
            copy.unlink(missing_ok=True)


# A machine `vlx node add`ed on node1 while the lab runs: not in the inventory.
NEW_NODE, NEW_MAC, NEW_IP = "node5", "52:54:00:00:00:15", "198.18.0.15"
# An SSH session reads no unit's environment file: `vlx` on a node finds the store in the
# one start-up wrote for every unit (and its client certificate, when the store has a CA).
NODE_ENV = ("set -a; . /etc/default/virtualinux; if [ -f /run/virtualinux/node/store.env ]; "
            "then . /run/virtualinux/node/store.env; fi; set +a; ")


def lab_ssh(lab: SelfHostedLab, node: str, command: str,
            timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*VLX, "lab", "ssh", "--state-dir", str(lab.state_dir), node, "--",
                           command], capture_output=True, text=True, timeout=timeout)


def test_the_admin_key_logs_in_and_each_node_presents_its_host_key_from_the_database(
        lab, tmp_path):
    # `vlx lab ssh` checks the node strictly against the key the store holds for it.
    for node in NODES:
        said = lab_ssh(lab, node, "hostname; systemctl is-active etcd.service iscsid.service; "
                                  "systemctl --failed --no-legend --plain")
        assert said.returncode in (0, 3), said.stderr       # 3: is-active saw an inactive unit
        lines = said.stdout.splitlines()
        print(node, "failed units:", lines[3:] or "none")
        # Debian's default etcd member never started; iscsid runs, with the record the
        # initramfs handed over, and holds the root's session (node1 and a reset node have
        # booted twice by now): it would log it in again after a network error.
        assert lines[:3] == [node, "inactive", "active"], said.stdout
        said = lab_ssh(lab, node, "iscsiadm -m session -P 1")
        assert "iSCSI Session State: LOGGED_IN" in said.stdout, said.stdout + said.stderr
        assert "Internal iscsid Session State: NO CHANGE" in said.stdout, said.stdout
        # The root's session has no NOP-Out pings and waits a day for its path (the
        # initramfs's node record, which iscsid's login at adoption applied again): a
        # stalled guest keeps its root.
        said = lab_ssh(lab, node, "cat /sys/class/iscsi_session/session*/recovery_tmo "
                                  "/sys/class/iscsi_connection/connection*/recv_tmo "
                                  "/sys/class/iscsi_connection/connection*/ping_tmo")
        # What iscsid said when it took the session (whether it read the record), for the
        # reader of a failure.
        adoption = lab_ssh(lab, node, "journalctl -b -o cat --no-pager -u iscsid.service "
                                      "-u etc-iscsi-nodes.mount; find /etc/iscsi/nodes").stdout
        print(node, "iscsid:", adoption)
        assert said.stdout.split() == ["86400", "0", "0"], said.stdout + said.stderr + adoption
    # The same login against a known_hosts that names node2's key for node1's address fails:
    # the check above could have failed.
    cluster = Database(lab.state_dir / "cluster.db").load()
    node2_key = host_keys.known_hosts(cluster, ["node2"])[0].split(" ", 1)[1]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{ADDRESS['node1']} {node2_key}\n")
    refused = lab.boot.run(["ssh", "-i", str(lab.state_dir / "admin" / "id_ed25519"),
                            "-o", f"UserKnownHostsFile={wrong}", *admin.SSH_OPTIONS,
                            f"root@{ADDRESS['node1']}", "true"], check=False, timeout=120)
    assert refused.returncode == 255 and "Host key verification failed" in refused.stderr, \
        refused.stderr


def test_a_node_added_on_node1_is_booted_by_node3_alone(lab):
    added = lab_ssh(lab, "node1", NODE_ENV + f"vlx node add {NEW_NODE} --mac {NEW_MAC} --ip "
                                             f"{NEW_IP} --cpus 1 --memory 1536MiB")
    assert added.returncode == 0, added.stdout + added.stderr
    assert f"added {NEW_NODE} {NEW_MAC} {NEW_IP}" in added.stdout
    script = f"http://{ADDRESS['node3']}/nodes/{NEW_MAC.replace(':', '-')}.ipxe"
    try:
        # Only node3's replica may answer: node1's and node2's boot services are stopped.
        for node in ("node1", "node2"):
            stopped = lab_ssh(lab, node, "systemctl stop virtualinux-bootsvc.service")
            assert stopped.returncode == 0, stopped.stderr
        assert not lab.answers_http(ADDRESS["node1"]) and not lab.answers_http(ADDRESS["node2"])
        # node3's replica follows the change made on node1.
        wait_for(lambda: lab.boot.run(["curl", "-sf", "-m", "3", "-o", "/dev/null", script],
                                      check=False).returncode == 0, 300,
                 f"node3 to serve {NEW_NODE}'s boot script")
        # The lab's SAN makes its root volume (as a storage operator would), then powers it on.
        powered = lab.vlx("lab", "power-on", NEW_NODE, timeout=600)
        assert powered.returncode == 0, powered.stdout + powered.stderr
        print(powered.stdout)
        wait_for(lambda: lab.serial(NEW_NODE).exists(), 60, f"{NEW_NODE}'s serial log")
        console = lab.wait_console(NEW_NODE, LAST_STEP, 0, REBOOT_TIMEOUT)
        assert re.search(rf"\[10 identity\] ok: {NEW_NODE} {re.escape(NEW_IP)}", console)
        # node3 answered it (its DHCP log), node1's and node2's services stayed stopped.
        journal = lab_ssh(lab, "node3", "journalctl -u virtualinux-bootsvc.service -o cat "
                                        "--no-pager").stdout
        assert f"DHCPACK {NEW_MAC} -> {NEW_IP} {NEW_NODE}" in journal
        assert re.search(rf"GET \S+ 200 \d+ bytes to {re.escape(NEW_IP)} ", journal), \
            journal[-3000:]
        for node in ("node1", "node2"):
            state = lab_ssh(lab, node, "systemctl is-active virtualinux-bootsvc.service")
            why = lab_ssh(lab, node, "systemctl status --no-pager -n 40 "
                                     "virtualinux-bootsvc.service").stdout
            assert state.stdout.strip() == "inactive", why
        # It presents the host key `vlx node add` made on node1 (node3 handed it in its cpio).
        said = lab_ssh(lab, NEW_NODE, "hostname")
        assert said.returncode == 0 and said.stdout.strip() == NEW_NODE, said.stderr
        print(lab.vlx("lab", "status").stdout)
    finally:
        for node in ("node1", "node2"):
            lab_ssh(lab, node, "systemctl start virtualinux-bootsvc.service")
        new = [n for n in lab.status()["nodes"] if n["name"] == NEW_NODE]
        if new and new[0]["qemu_pid"]:
            os.kill(new[0]["qemu_pid"], signal.SIGKILL)     # 3 TCG guests for the last test
    wait_for(lambda: lab.answers_http(ADDRESS["node1"]) and lab.answers_http(ADDRESS["node2"]),
             120, "node1's and node2's replicas to serve again")


def test_a_reboot_completes_while_another_node_is_killed(lab):
    node3 = [n for n in lab.status()["nodes"] if n["name"] == "node3"][0]
    offset = lab.reset("node1")
    os.kill(node3["qemu_pid"], signal.SIGKILL)
    lab.wait_console("node1", LAST_STEP, offset, REBOOT_TIMEOUT)
    console = lab.wait_console("node1", DATABASE_STEP, offset, REBOOT_TIMEOUT)
    assert "[30 database] ok: etcd member node1 on 198.18.0.11 restarts as itself" in console
    wait_for(lambda: lab.answers_http(ADDRESS["node1"]), 300, "node1's replica to serve")
    wait_for(lambda: {m["name"]: m["healthy"] for m in lab.members()} ==
             {"node1": True, "node2": True, "node3": False}, 300,
             "node1 and node2 to hold the database without node3", interval=2)
