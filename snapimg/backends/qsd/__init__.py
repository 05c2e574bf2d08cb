"""The qsd backend: snapshots carried by qemu-storage-daemon (docs/qemu-backend.md)."""

from snapimg.backends.qsd.backend import QsdBackend, start

__all__ = ["QsdBackend", "start"]
