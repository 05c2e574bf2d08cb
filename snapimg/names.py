"""The one rule for export and snapshot names, used by the CLI, the control socket, the
engine and both backends, so that all of them accept and refuse the same names with the
same message.

A *name* (an origin's export name ``NAME`` or a snapshot name ``SNAP``; the snapshot's
export is ``NAME@SNAP``) is 1 to :data:`MAX_NAME_BYTES` bytes of UTF-8 made of printable
characters (:meth:`str.isprintable`: no control characters, no line breaks, no Unicode
space other than the ASCII space), that

- contains no ``@`` (it separates ``NAME@SNAP``) and no ``/`` (a name becomes part of a
  file name in the store, and an NBD URI path with ``/`` reads like a path);
- does not start or end with white space (``" "`` and ``"mon "`` are refused: such
  names look like other names on a terminal).

Every other character is allowed, URI-reserved ones included (``:?#[]!$&'()*+,;=%``,
spaces inside a name, non-ASCII letters): snapimg prints NBD URIs percent-encoded
(:func:`snapimg.nbd.uri.unix_uri`), which nbdinfo, qemu-img and snapimg read back to
the same export name.
"""

from __future__ import annotations

from snapimg.errors import UsageError

MAX_NAME_BYTES = 100  # "NAME@SNAP.qsd.qcow2" stays below the 255-byte file-name limit

RULE = (
    f"1-{MAX_NAME_BYTES} bytes of printable characters without '@' or '/', "
    "not starting or ending with a space"
)


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it follows the rule, else raise :class:`UsageError`.

    ``what`` names the thing in the message: ``"snapshot name"`` or ``"export name"``.
    """
    if (
        not isinstance(name, str)
        or not name
        or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
        or not name.isprintable()
        or "@" in name
        or "/" in name
        or name != name.strip()
    ):
        raise UsageError(f"bad {what} {shown(name)}: {RULE}")
    return name


def check_snapshot_name(snap: str) -> str:
    return check_name(snap, "snapshot name")


def check_export_name(name: str) -> str:
    return check_name(name, "export name")


def split_snapshot_name(text: str, *, existing: bool = False) -> tuple[str, str]:
    """``"disk@monday"`` -> ``("disk", "monday")``.

    A name for a new snapshot must follow the rule; one that names an ``existing``
    snapshot (drop, release) only needs both parts, so that snapshots made under an
    older, looser rule can still be dropped.
    """
    origin, sep, snap = text.partition("@")
    if not sep or (existing and (not origin or not snap)):
        raise UsageError(f"bad snapshot {shown(text)}: expected NAME@SNAP")
    if existing:
        return origin, snap
    return check_export_name(origin), check_snapshot_name(snap)


def shown(text: object, limit: int = 40) -> str:
    """``repr`` of a user-given value for a one-line message, cut after ``limit`` chars."""
    if isinstance(text, str) and len(text) > limit:
        return repr(text[:limit]) + f"... ({len(text)} characters)"
    return repr(text)
