"""Backup directories: qcow2 points written by QEMU, their sha256-pieces digests, restore,
verify and prune.  The package map is in docs/architecture.md, the on-disk formats and
the digest rule in docs/backup.md.
"""
