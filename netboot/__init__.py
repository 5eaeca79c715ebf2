"""netboot: what a booting node is handed. Renders, from one database generation, the netboot
tree (Debian's iPXE binaries, kernels and initrds) and the per-node iPXE scripts and kernel
command lines that name each node's host name, address and iSCSI root volume. Imports the model
only; bootsvc's TFTP and HTTP services serve what it renders.
"""
