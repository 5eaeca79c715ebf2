"""storage: golden and copy-on-write snapshot volumes behind one small backend interface
(reflink files, LVM thin, qcow2), and their export over iSCSI with tgt: one target per volume,
per-initiator ACLs and CHAP credentials kept in the database. Imports the model only.
"""
