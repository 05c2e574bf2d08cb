"""The one exception tree of snapimg.

Every error snapimg raises on purpose derives from :class:`SnapimgError`.  The CLI
prints ``str(err)`` as one line and exits non-zero; anything else is a bug and keeps
its traceback.

Errors that a block device returns to an I/O client carry an ``errno`` so that the
NBD server can map them onto the NBD error codes without knowing the engine::

    SnapimgError
     +-- UsageError                bad user input (sizes, names, arguments)
     +-- DeviceError  (errno)      an I/O request a device refuses or cannot serve
     |    +-- OutOfRangeError      EINVAL: beyond the device end, bad length
     |    +-- ReadOnlyError        EPERM:  write to a read-only snapshot
     |    +-- SnapshotInvalidError EIO:    the snapshot was invalidated (store full, crash)
     |    +-- ReleasedRangeError   EIO:    a range the backup reader already released
     |    +-- NoSpaceError         ENOSPC: store full under policy block-writes
     |    +-- StoreStalledError    EIO:    copies not done within --cbw-timeout
     +-- StoreError                the preservation store cannot be opened or written
     |    +-- StoreFormatError     truncated, corrupted or unknown-version store
     |    +-- StoreMismatchError   the store belongs to another origin
     +-- SnapshotError             snapshot lifecycle (unknown, duplicate name, ...)
     +-- EngineClosedError         a lifecycle call on an engine that was closed
     +-- ImageInUseError           another QEMU or snapimg process holds the image's locks
     +-- ProtocolError             NBD wire protocol violations
     +-- ControlError              control socket: server not running, bad request
     +-- BackupError               backup directory: bad manifest, broken chain, failed verify
     +-- FilesystemError           a filesystem inside an image: missing, damaged, no such file
     +-- QemuError                 QEMU / QMP failures (error class, description, command)
     +-- QgaError                  the guest agent refused a command (its error class, desc,
     |    |                        command) or could not be reached
     |    +-- QgaTimeoutError      the guest agent did not answer within the timeout

Errors that stand for another program's refusal carry its data as fields (as qemu.qmp's
``ExecuteError`` does): callers match on ``QemuError.error_class``/``desc``/``command``,
never on the text, which is the one line a user sees.  The VM test rig has its own
``vmtests.errors.VmError``, outside this tree.
"""

from __future__ import annotations

import errno as _errno
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snapimg.imagelock import Holder


class SnapimgError(Exception):
    """Base of every error snapimg raises on purpose."""


class UsageError(SnapimgError):
    """The user asked for something malformed (a bad size, an unknown name, ...)."""


class DeviceError(SnapimgError):
    """An I/O request that a block device refuses; ``errno`` says how to report it."""

    errno: int = _errno.EIO


class OutOfRangeError(DeviceError):
    errno = _errno.EINVAL


class ReadOnlyError(DeviceError):
    errno = _errno.EPERM


class SnapshotInvalidError(DeviceError):
    errno = _errno.EIO


class ReleasedRangeError(DeviceError):
    errno = _errno.EIO


class NoSpaceError(DeviceError):
    errno = _errno.ENOSPC


class StoreStalledError(DeviceError):
    """A write's copies into the store did not complete within the copy-before-write
    timeout, and the snapshots' policy does not allow the write to go on (EIO)."""

    errno = _errno.EIO


class StoreError(SnapimgError):
    """The preservation store cannot be opened, read or written."""


class StoreFormatError(StoreError):
    """The store is truncated, corrupted or of an unknown version."""


class StoreMismatchError(StoreError):
    """The store was made for another origin (size or fingerprint differ)."""


class SnapshotError(SnapimgError):
    """Snapshot lifecycle errors: unknown snapshot, duplicate name, ..."""


class EngineClosedError(SnapimgError):
    """A snapshot lifecycle call on an engine that was closed (I/O on its devices fails
    with a :class:`DeviceError`, EIO, instead)."""


class ImageInUseError(SnapimgError):
    """An image is locked by another QEMU or snapimg process (:mod:`snapimg.imagelock`).

    ``permission`` is the QEMU permission that could not be had ("write", ...),
    ``holders`` the processes seen holding the image's lock bytes.
    """

    def __init__(
        self,
        message: str,
        *,
        path: Path | None = None,
        permission: str | None = None,
        holders: tuple[Holder, ...] = (),
    ) -> None:
        super().__init__(message)
        self.path = path
        self.permission = permission
        self.holders = holders


class ProtocolError(SnapimgError):
    """A peer broke the NBD protocol."""


class ControlError(SnapimgError):
    """The control socket: server not running, malformed or failed request."""


class BackupError(SnapimgError):
    """A backup directory is unusable: bad manifest, broken chain, verification failed."""


class FilesystemError(SnapimgError):
    """A filesystem inside an image (ls, cat): none there, damaged, or no such path."""


class QemuError(SnapimgError):
    """QEMU refused a QMP command or a QEMU process failed.

    ``desc`` says what happened: QEMU's own description of a refused command, else
    snapimg's.  ``error_class`` is the QMP error class of a refused command
    (``GenericError``, ``DeviceNotFound``, ...), None for other failures; ``command`` the
    QMP command that failed, if one did; ``where`` the QEMU process, if the message names
    it.  The message: ``[WHERE: ][QMP error CLASS: ]DESC[ (command COMMAND)]``.
    """

    def __init__(
        self,
        desc: str,
        *,
        error_class: str | None = None,
        command: str | None = None,
        where: str | None = None,
    ) -> None:
        self.desc = desc
        self.error_class = error_class
        self.command = command
        self.where = where
        text = f"QMP error {error_class}: {desc}" if error_class else desc
        if command:
            text += f" (command {command})"
        super().__init__(f"{where}: {text}" if where else text)


class QgaError(SnapimgError):
    """The guest agent (qemu-guest-agent, directly or through libvirt) failed a command.

    ``error_class`` is the agent's own error class (``GenericError``, ``CommandNotFound``,
    ...) when the agent answered with an error, None when it could not be reached;
    ``desc`` is its description and ``command`` the command (``guest-fsfreeze-freeze``)."""

    def __init__(
        self,
        desc: str,
        *,
        command: str | None = None,
        error_class: str | None = None,
        where: str | None = None,
    ) -> None:
        self.desc = desc
        self.command = command
        self.error_class = error_class
        self.where = where
        parts = [f"guest agent at {where}" if where else "guest agent"]
        if command:
            parts.append(command)
        text = ": ".join(parts) + ": "
        super().__init__(text + (f"{error_class}: {desc}" if error_class else desc))


class QgaTimeoutError(QgaError):
    """The guest agent did not answer a command within the timeout."""
