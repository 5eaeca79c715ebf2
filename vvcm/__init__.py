"""vvcm: the cluster database and virtual-cluster management, and the `vlx` command line.

The database (`db`) holds one `Cluster` (`model`) per generation: settings, physical nodes, virtual
clusters and their VMs, volumes and credentials. Changes are pure functions (`changes`) applied in
one transaction each; the inventory TOML a person writes is read and written by `inventory`.
Every other area of virtualinux imports from here; the model imports nothing else of the project,
and only the command line (`vvcm.cli`) imports the other areas.
"""

from .db import Database
from .errors import NotFound, VlxError
from .model import VM, Cluster, Credential, Node, Settings, VirtualCluster, Volume

__all__ = ["Cluster", "Credential", "Database", "Node", "NotFound", "Settings", "VM",
           "VirtualCluster", "VlxError", "Volume"]
