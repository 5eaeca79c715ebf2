"""The boot services of a node answer DHCP and DNS on the VC bridges built on it, for that VC's
VMs only: a real `vlx bootsvc run` in a node namespace, the VC networks built afterwards by
vvcm.virt.network (the daemon follows them through netlink, with no new generation), and
"VMs" that are namespaces plugged into the bridges with the VMs' MACs, asking with udhcpc and
dig. Everything goes with the namespaces, also when a test fails."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess

import pytest
from virtualinux.bootsvc.status import read_status
from virtualinux.vm_test.wait import wait_for
from virtualinux.vvcm import inventory
from virtualinux.vvcm.virt import network

from .conftest import EXAMPLE, ROOT, require
from .test_dhcp_lab import VLX, Replica, events, recording_script

pytestmark = pytest.mark.lab
NODE1 = "198.18.0.11"
TINY_UDHCPC = ROOT / "image" / "tiny-udhcpc.sh"


@pytest.fixture
def node1(db, db_path, netns, tmp_path):
    """Namespace `node` holding node1's address on eth0 and running its dhcp and dns."""
    with serving_node1(db, db_path, netns, tmp_path) as (replica, _hub, _bridge):
        yield replica


@contextlib.contextmanager
def serving_node1(db, db_path, netns, tmp_path):
    """node1 as the fixture above makes it; yields (replica, hub namespace, hub bridge): the
    hub's bridge is the cluster network."""
    require("udhcpc", "dig")
    db.update("db import", "test",
              lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))
    hub = netns.namespace("hub")
    bridge = netns.bridge(hub)
    ns = netns.namespace("node")
    netns.plug(hub, bridge, ns, address=f"{NODE1}/24")
    state_dir, log = tmp_path / "state", tmp_path / "node1.log"
    process = ns.popen([*VLX, "--db", str(db_path), "bootsvc", "run", "--interface", "eth0",
                        "--node", "node1", "--services", "dhcp,dns", "--state-dir",
                        str(state_dir), "--poll", "0.2"],
                       stdout=log.open("w"), stderr=subprocess.STDOUT)
    replica = Replica(NODE1, process, state_dir, log, ns)
    try:
        replica.wait_running()
        yield replica, hub, bridge
    finally:
        replica.stop()


def plan_in(cluster, vc: str, ns) -> network.NodePlan:
    plan = network.node_plans(cluster, vc, ["node1"])[0]
    return dataclasses.replace(plan, netns=ns.name)


def served(replica: Replica, service: str, key: str) -> list[str]:
    return read_status(replica.state_dir).details(service).get(key, [])


def counter(replica: Replica, name: str) -> int:
    status = read_status(replica.state_dir)
    return status.services["dhcp"].counters.get(name, 0) if "dhcp" in status.services else 0


def vm_port(netns, replica: Replica, bridge: str, cluster, vm: str):
    """A namespace standing for VM `vm`: its MAC, plugged into `bridge` on the node."""
    ns = netns.namespace(vm)
    mac = next(v.mac for v in cluster.vms if v.name == vm)
    netns.plug(replica.namespace, bridge, ns, mac=mac)
    return ns


def test_vms_get_address_dns_and_domain_on_their_bridge_only_and_resolve_short_names(
        node1, db, netns, tmp_path):
    cluster = db.load()
    green, tan = plan_in(cluster, "green", node1.namespace), plan_in(cluster, "tan",
                                                                      node1.namespace)
    # Built after the daemon started: it must notice the bridges without a new generation.
    for plan in (green, tan):
        network.ensure(plan)
    assert network.bridge_addresses(green) == ["198.19.3.254/24"]
    assert not network.forwarding(green)      # the node routes nothing from a VC
    wait_for(lambda: served(node1, "dhcp", "vc_interfaces") == ["vlxbr103", "vlxbr104"], 30,
             "dhcp on both VC bridges")
    wait_for(lambda: served(node1, "dns", "vc_addresses") == ["198.19.3.254", "198.19.4.254"],
             30, "dns on both service addresses")

    green1 = vm_port(netns, node1, green.bridge, cluster, "green-1")
    script, out = recording_script(tmp_path, "green-1")
    green1.run(["udhcpc", "-i", "eth0", "-f", "-q", "-n", "-s", str(script), "-t", "5",
                "-T", "1", "-O", "search"], timeout=60)
    bound = next(e for e in events(out) if e["EVENT"] == "bound")
    assert (bound["ip"], bound["subnet"], bound["dns"]) == (
        "198.19.3.1", "255.255.255.0", "198.19.3.254")
    assert (bound["domain"], bound["search"], bound["hostname"]) == (
        "green.cluster.lab", "green.cluster.lab", "green-1")
    assert bound["serverid"] == "198.19.3.254" and "router" not in bound

    # The VM resolves another VM of its VC by short name, with the search list DHCP gave it.
    green1.add_address("eth0", f"{bound['ip']}/24")
    answer = green1.run(["dig", "+short", "+search", f"+domain={bound['search']}",
                         f"@{bound['dns']}", "green-2"], timeout=30).stdout.split()
    assert answer == ["198.19.3.2"]

    # The tiny image's DHCP script and busybox's resolver: the VM's own /etc and /run.
    tiny_script = tmp_path / "tiny-udhcpc.sh"
    tiny_script.write_bytes(TINY_UDHCPC.read_bytes())
    tiny_script.chmod(0o755)
    guest = (f"mount -t tmpfs etc /etc && mount -t tmpfs run /run && udhcpc -i eth0 -f -q -n "
             f"-s {tiny_script} -t 5 -T 1 -O search >/dev/null 2>&1 && cat /etc/resolv.conf "
             f"&& busybox nslookup green-2")
    looked_up = green1.run(["unshare", "-m", "--propagation", "private", "sh", "-c", guest],
                           check=False, timeout=60)
    assert "search green.cluster.lab" in looked_up.stdout, looked_up.stderr
    assert re.search(r"^Name:\s+green-2\.green\.cluster\.lab\s+Address: 198\.19\.3\.2$",
                     looked_up.stdout, re.MULTILINE), looked_up.stdout + looked_up.stderr

    # tan-1 on green's bridge gets nothing, and the replica says why.
    stray = vm_port(netns, node1, green.bridge, cluster, "tan-1")
    script, out = recording_script(tmp_path, "tan-1")
    result = stray.run(["udhcpc", "-i", "eth0", "-f", "-q", "-n", "-s", str(script), "-t",
                        "2", "-T", "1"], check=False, timeout=60)
    assert result.returncode != 0 and not [e for e in events(out) if e["EVENT"] == "bound"]
    wait_for(lambda: counter(node1, "ignored_wrong_network") >= 2, 30,
             "tan-1's DISCOVERs counted as on the wrong network")

    # The VC network goes: so do the listeners on it.
    network.remove(green)
    wait_for(lambda: served(node1, "dhcp", "vc_interfaces") == ["vlxbr104"], 30,
             "dhcp off the removed bridge")
    wait_for(lambda: served(node1, "dns", "vc_addresses") == ["198.19.4.254"], 30,
             "dns off the removed address")
    network.remove(tan)
    assert node1.stop() == 0        # a clean stop, with the netlink follower
    assert "Traceback" not in node1.log.read_text()
