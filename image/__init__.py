"""image: building the golden images with diskimage-builder. Our elements (image/elements/)
make the node image (host OS of every physical node: kernel, initrd, root file system) and the
guest image of VC VMs; the build driver caches by the hash of its inputs; the tiny busybox
initramfs used by the lab and fast tests is built here too. Imports the model only.
"""
