"""storage: golden and copy-on-write snapshot volumes behind one small backend interface
(reflink files, LVM thin, qcow2), and their export over iSCSI with tgt: one target per volume,
per-initiator ACLs and CHAP credentials kept in the database. Imports the model only.

    naming      IQNs, initiator names, volume names, sizes, CHAP credentials (pure)
    backend     the Backend interface, the registry by name, shared file helpers
    reflink     btrfs/XFS clones          qcow2     overlays for libvirt
    lvm_thin    thin LVs and snapshots    volumes   the operations `vlx volume` runs
    tgt         a private tgtd per portal, made to match the database
    backup      a whole VC to sparse files + vc.json, and back
"""
