"""NBD URIs as snapimg prints them (NetworkBlockDevice/nbd doc/uri.md, RFC 3986).

The export name is the URI path after its leading ``/``, percent-encoded as libnbd's
``nbd_get_uri`` does: RFC 3986 unreserved characters, ``@`` and the sub-delimiters stay
as they are (``nbd+unix:///disk@monday?...``), everything else (space, ``:?#[]%``,
non-ASCII as UTF-8 bytes) becomes ``%XX``.  The socket path is a query value: every
character but unreserved ones and ``/`` is encoded (libnbd prints it raw, which breaks
on ``&``, ``#`` or spaces).  nbdinfo, qemu-img, qemu-io and snapimg decode both back.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

_PATH_SAFE = "@!$&'()*+,;="  # pchar minus ':' (libnbd encodes it too)
_QUERY_SAFE = "/"


def unix_uri(export: str, socket: Path | str) -> str:
    """``nbd+unix:///EXPORT?socket=PATH`` with both parts percent-encoded."""
    return (
        f"nbd+unix:///{quote(export, safe=_PATH_SAFE)}"
        f"?socket={quote(str(socket), safe=_QUERY_SAFE)}"
    )
