"""SSH to Linux guests with paramiko: fresh keys per run, a pinned host key, timeouts everywhere.

The rig makes both key pairs itself: the client key (:class:`ClientKey`) goes into the guest's
``authorized_keys`` and the host key (:class:`HostKey`) into dropbear's key file, through the
per-run initramfs overlay.  :class:`SshSession` then accepts only that host key (paramiko's
RejectPolicy with the key pinned), so a stale VM on a reused port cannot answer for the new one.
Every command's output and exit status goes to the ``vmtests.ssh`` logger and to a log file.
"""

from __future__ import annotations

import io
import logging
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vmtests.errors import HostKeyMismatch, VmError

log = logging.getLogger("vmtests.ssh")
# paramiko logs every refused early connect (expected while the guest boots) at ERROR; without a
# handler of its own Python's last-resort handler would print those tracebacks on stderr.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


@dataclass(frozen=True)
class HostKey:
    """An ed25519 host key: dropbear's private key file and the public key paramiko pins."""

    seed: bytes
    public: bytes

    @classmethod
    def generate(cls) -> HostKey:
        key = Ed25519PrivateKey.generate()
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(seed, public)

    def dropbear_file(self) -> bytes:
        """The key in dropbear's own format: string "ssh-ed25519", string (seed || public)."""
        return _ssh_string(b"ssh-ed25519") + _ssh_string(self.seed + self.public)

    def paramiko_key(self) -> paramiko.PKey:
        return paramiko.Ed25519Key(data=_ssh_string(b"ssh-ed25519") + _ssh_string(self.public))


@dataclass(frozen=True)
class ClientKey:
    """The rig's own ed25519 key pair for logging in as root."""

    pem: str
    authorized_line: str

    @classmethod
    def generate(cls) -> ClientKey:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ).decode()
        public = (
            key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
        return cls(pem, f"{public} snapimg-vmtests\n")

    def paramiko_key(self) -> paramiko.PKey:
        return paramiko.Ed25519Key.from_private_key(io.StringIO(self.pem))


@dataclass(frozen=True)
class Result:
    command: str
    status: int
    stdout: str
    stderr: str

    def check(self) -> Result:
        if self.status != 0:
            tail = (self.stderr or self.stdout).strip().splitlines()[-3:]
            raise VmError(
                f"guest command {self.command[:60]!r} exited {self.status}: " + " | ".join(tail)
            )
        return self


class SshSession:
    """One SSH connection to a guest (root, key auth, host key pinned)."""

    def __init__(self, client: paramiko.SSHClient, log_file: Path | None) -> None:
        self._client = client
        self._log_file = log_file

    @classmethod
    def try_connect(
        cls,
        port: int,
        client_key: ClientKey,
        host_key: HostKey,
        *,
        timeout: float,
        log_file: Path | None = None,
        host: str = "127.0.0.1",
    ) -> SshSession | None:
        """One login attempt: a session, or None if the guest is not answering yet.

        A host key other than the pinned one is never "not yet": it raises
        :class:`~vmtests.errors.HostKeyMismatch`.
        """
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        pinned = host_key.paramiko_key()
        client.get_host_keys().add(f"[{host}]:{port}", pinned.get_name(), pinned)
        try:
            client.connect(
                host,
                port,
                username="root",
                pkey=client_key.paramiko_key(),
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                look_for_keys=False,
                allow_agent=False,
            )
            return cls(client, log_file)
        except paramiko.BadHostKeyException as err:
            client.close()
            raise HostKeyMismatch(host, port, str(err)) from err
        except (paramiko.SSHException, OSError, EOFError) as err:
            client.close()
            log.debug("ssh %s:%d not answering yet: %r", host, port, err)
            return None

    @classmethod
    def connect(
        cls,
        port: int,
        client_key: ClientKey,
        host_key: HostKey,
        *,
        timeout: float,
        log_file: Path | None = None,
        host: str = "127.0.0.1",
    ) -> SshSession:
        """Connect, retrying while the guest starts (slirp resets early connections)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            session = cls.try_connect(
                port,
                client_key,
                host_key,
                timeout=min(5.0, remaining),
                log_file=log_file,
                host=host,
            )
            if session is not None:
                return session
            time.sleep(0.2)
        raise VmError(f"ssh {host}:{port}: no login within {timeout:g}s")

    def run(
        self, command: str, *, timeout: float, stdin: bytes | None = None, check: bool = True
    ) -> Result:
        """Run ``command`` (by the guest's /bin/sh); VmError after ``timeout`` seconds."""
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise VmError("ssh: connection is closed")
        started = time.monotonic()
        deadline = started + timeout
        chan = transport.open_session(timeout=timeout)
        out, err = bytearray(), bytearray()
        try:
            chan.settimeout(timeout)
            chan.exec_command(command)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            while True:
                busy = False
                while chan.recv_ready():
                    out += chan.recv(65536)
                    busy = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    busy = True
                if (
                    chan.exit_status_ready()
                    and not chan.recv_ready()
                    and not chan.recv_stderr_ready()
                ):
                    break
                if time.monotonic() > deadline:
                    self._record(command, None, out, err, time.monotonic() - started)
                    raise VmError(f"guest command {command[:60]!r}: no exit within {timeout:g}s")
                if not busy:
                    time.sleep(0.02)
            status = chan.recv_exit_status()
        except (paramiko.SSHException, OSError) as exc:
            raise VmError(f"guest command {command[:60]!r}: ssh failed: {exc!r}") from exc
        finally:
            chan.close()
        self._record(command, status, out, err, time.monotonic() - started)
        result = Result(command, status, out.decode(errors="replace"), err.decode(errors="replace"))
        return result.check() if check else result

    def _record(
        self,
        command: str,
        status: int | None,
        out: bytes | bytearray,
        err: bytes | bytearray,
        seconds: float,
    ) -> None:
        text = (
            f"$ {command}\n{out.decode(errors='replace')}"
            + (f"[stderr]\n{err.decode(errors='replace')}" if err else "")
            + f"[exit {status if status is not None else 'timeout'}, {seconds:.1f}s]\n"
        )
        log.info("%s", text.rstrip())
        if self._log_file is not None:
            with self._log_file.open("a", encoding="utf-8") as handle:
                handle.write(text)

    def start_background(self, command: str, *, timeout: float) -> None:
        """Start ``command`` detached in the guest (survives this channel); output to a file."""
        self.run(f"setsid sh -c {_quote(command)} >/tmp/bg.log 2>&1 </dev/null &", timeout=timeout)

    def close(self) -> None:
        self._client.close()


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
