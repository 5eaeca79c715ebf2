"""40 vcnet: this node's part of the VC networks, from the database.

`vlx vc create` builds a VC's network on the node it runs on (or in lab nodes' namespaces);
every other node hosting one of the VC's VMs builds its own part here, at start-up: for each
VC with a VM placed on this node, the VC's firewall table, its bridge with its service address
and the VXLAN (or VLAN) device peered with the VC's other hosting nodes
(vvcm.virt.network.ensure: idempotent, peers synced). VC devices and firewall tables of VCs
that no longer have a VM here are removed. The boot services
(step 50) then answer DHCP and DNS on these bridges as they appear.

Without `live` (a root directory in tests, or an image being prepared) it only says what the
node would hold: the network is the running system's, not a file under the root.
"""

from __future__ import annotations

from virtualinux.vvcm.virt import network

from ..startup import Boot, Step


def run(boot: Boot) -> str:
    plans = network.plans_for_node(boot.cluster, boot.node.name)
    shown = ", ".join(f"{plan.bridge} ({plan.address or 'no service address'}, "
                      f"{len(plan.peers)} peers)" for plan in plans) or "no VC here"
    if not boot.live:
        return f"would hold {shown} (not live: nothing made)"
    made = [name for plan in plans for name in network.ensure(plan)]
    removed = network.remove_stale(boot.node, plans)
    said = [shown]
    if made:
        said.append(f"made {', '.join(made)}")
    if removed:
        said.append(f"removed stale {', '.join(removed)}")
    if not made and not removed:
        said.append("(unchanged)")
    return "; ".join(said)


STEP = Step(name="vcnet", order=40, run=run, needs=("identity",),
            makes="the VC bridges, VXLAN/VLAN devices and firewall tables of the VCs with VMs on "
                  "this node")
