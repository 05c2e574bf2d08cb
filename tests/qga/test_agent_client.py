"""The guest agent client against Debian's real qemu-ga (freeze and thaw blocked on the host)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapimg.errors import QgaError, QgaTimeoutError
from snapimg.qga.client import AgentClient


def test_sync_then_commands(host_agent: Path) -> None:
    with AgentClient(host_agent, timeout=10) as client:
        client.ping()
        assert client.fsfreeze_status() == "thawed"
        info = client.execute("guest-info")
        names = {cmd["name"] for cmd in info["supported_commands"]}
        assert {"guest-fsfreeze-freeze", "guest-sync-delimited"} <= names


def test_agent_errors_carry_its_class(host_agent: Path) -> None:
    with AgentClient(host_agent, timeout=10) as client:
        with pytest.raises(QgaError) as refused:
            client.fsfreeze_freeze()
        assert refused.value.error_class == "CommandNotFound"
        assert refused.value.command == "guest-fsfreeze-freeze"
        assert "disabled" in refused.value.desc
        assert str(refused.value).startswith(
            f"guest agent at {host_agent}: guest-fsfreeze-freeze: CommandNotFound: "
        )
        with pytest.raises(QgaError) as bad:
            client.execute("guest-ping", {"no-such-argument": 1})
        assert bad.value.error_class == "GenericError"
        client.ping()  # the connection is still usable after errors


def test_a_late_reply_is_skipped(host_agent: Path) -> None:
    """A reply to a command the client gave up on (written here straight to the socket, as
    if an earlier call had timed out) must not be taken for the next command's reply."""
    with AgentClient(host_agent, timeout=10) as client:
        assert client._sock is not None
        client._sock.sendall(json.dumps({"execute": "guest-info", "id": "abandoned"}).encode())
        assert client.fsfreeze_status() == "thawed"
        assert client.execute("guest-ping") == {}


def test_resync_flushes_a_partial_request(host_agent: Path) -> None:
    """Half a request left in the agent's parser (a client killed mid-write): the 0xFF that
    precedes guest-sync-delimited makes the agent drop it; the parse error it answers with
    is skipped."""
    with AgentClient(host_agent, timeout=10) as client:
        assert client._sock is not None
        client._sock.sendall(b'{"execute": "guest-fsfreeze-st')
        client.sync()
        assert client.fsfreeze_status() == "thawed"


def test_silent_agent_times_out(silent_agent: Path) -> None:
    client = AgentClient(silent_agent, timeout=0.5)
    with pytest.raises(QgaTimeoutError) as timeout:
        client.connect()
    assert timeout.value.command == "guest-sync-delimited"
    assert str(timeout.value) == (
        f"guest agent at {silent_agent}: guest-sync-delimited: no answer within 0.5 s"
    )
    client.close()


def test_no_agent_socket(tmp_path: Path) -> None:
    with pytest.raises(QgaError, match="no guest agent channel listens there"):
        AgentClient(tmp_path / "absent.sock").connect()
