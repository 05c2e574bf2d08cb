"""Unix socket paths a server is about to listen on (NBD and control sockets).

:func:`prepare_unix_socket_path` refuses, with one line, a path that cannot become a
socket (too long for ``sun_path``, no such directory, not writable, a file that is not a
socket, a socket another server listens on) and removes the leftover socket of a server
that was killed.  It creates nothing.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from snapimg.errors import UsageError

# sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH = 107


def prepare_unix_socket_path(path: Path) -> None:
    """Check that ``path`` can become a listening unix socket; remove a stale one."""
    length = len(os.fsencode(path))
    if length > MAX_SOCKET_PATH:
        raise UsageError(
            f"socket path {path} is {length} bytes long: unix sockets allow "
            f"{MAX_SOCKET_PATH} bytes (choose a shorter path)"
        )
    if not path.exists() and not path.is_symlink():
        if not path.parent.is_dir():
            raise UsageError(f"cannot create socket {path}: no such directory {path.parent}")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise UsageError(f"cannot create socket {path}: {path.parent} is not writable")
        return
    if not path.is_socket():
        raise UsageError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()  # nobody listens: a leftover of a killed server
    except OSError as err:
        if err.errno == errno.EACCES:
            raise UsageError(f"socket {path} exists and is not ours to reuse") from None
        raise UsageError(f"cannot use socket {path}: {err.strerror}") from None
    else:
        raise UsageError(f"socket {path} is in use by another server")
    finally:
        probe.close()
