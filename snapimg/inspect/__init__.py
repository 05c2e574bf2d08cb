"""Looking inside images without running them: sources (files, NBD exports, qcow2,
backup points), partitions, filesystems and their files, allocation, diff, checksum and
the store view (docs/inspect.md)."""
