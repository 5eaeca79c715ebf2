# Interfaces are set up by the initramfs (node) or by virtualinux-guest, never by
# debootstrap's default "eth0 inet dhcp".
export DIB_APT_MINIMAL_CREATE_INTERFACES=0
