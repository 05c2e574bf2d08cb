"""Fixtures of the inspect tests (defined in helpers.py with the image builders)."""

from tests.inspect.helpers import gpt_disk, qsd_export

__all__ = ["gpt_disk", "qsd_export"]
