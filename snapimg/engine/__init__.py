"""Copy-before-write snapshots of raw images: the engine and its preservation store.

See docs/library-api.md for the API and docs/store-format.md for the on-disk store.
"""

from snapimg.engine.devices import OriginDevice, SnapshotDevice
from snapimg.engine.engine import Engine

__all__ = ["Engine", "OriginDevice", "SnapshotDevice"]
