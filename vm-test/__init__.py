"""vm-test: the virtual lab. Network namespaces, bridges and taps it owns, QEMU (TCG) nodes
that PXE-boot from the boot services, and scenarios (boot, failover, VC) that tests and
`vlx lab` run. Everything the lab makes is recorded so that `down` (or a test's teardown)
removes it, also after a crash.
"""
