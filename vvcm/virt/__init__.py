"""Virtual clusters on libvirt: domain XML rendered from the database (`domain`), the
connection to each node's libvirt (`connect`), the per-VC private network built with pyroute2
(`network`), and the life cycle of a VC: create, start, stop, destroy, status (`lifecycle`),
migrate and drain (`migrate`), backup jobs (`backup`).

It imports the model and the database of vvcm, nothing else of the project. What it needs
from storage (disks for VMs, removing them) comes in as a `lifecycle.Disks` argument that the
command line builds, because storage is downstream of vvcm in the data flow.
"""
