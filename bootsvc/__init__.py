"""bootsvc: the replicated boot services, one daemon on every node.

DHCP, TFTP, HTTP, cache-only DNS and the gateway heartbeat each live in a module of their own
behind one small interface (`service.Service`: start, stop, reload, counters), chosen by name.
Every answer is computed from (database generation, request) alone, so any replica answers
any client the same way. Imports the model (`virtualinux.vvcm`) and `netboot`; never the CLI.
"""
