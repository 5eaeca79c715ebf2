"""initscripts: boot-time init of a node. The initramfs hook that attaches the node's snapshot
root over iSCSI and switches to it, then the node's start-up: its bootsvc replica, the gateway
heartbeat if it is one of the pair, and the VMs the database places on it.
"""
