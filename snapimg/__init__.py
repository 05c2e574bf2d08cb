"""snapimg: point-in-time snapshots of raw VM disk images, served over NBD."""

__version__ = "0.1.0"
