"""One-shot full and incremental backups of snapshots served over NBD, and restore.

Modules: :mod:`manifest` (DIR/manifest.json), :mod:`fileio` (atomic files, sparse-aware
reads), :mod:`incfile` (the incremental file format), :mod:`copy` (NBD -> file copy),
:mod:`chain` (the image as of a backup: full + incrementals), :mod:`verify`,
:mod:`restore`, :mod:`job` (snapshot -> copy -> verify -> manifest), :mod:`progress`.
The on-disk formats are documented in docs/backup.md.
"""
