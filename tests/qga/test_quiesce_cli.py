"""``--quiesce`` on the command line without a guest: an agent that never answers, an agent
that refuses, bad options, and the quiesce records the control server keeps."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from snapimg.control.client import ControlClient
from snapimg.errors import SnapshotError
from tests.interop.serving import Serve, snapimg

MIB = 1 << 20


@pytest.fixture
def served(serve: Callable[..., Serve], tmp_path: Path) -> Serve:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x5a" * (4 * MIB))
    return serve([f"disk={image}"])


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def _snapshots(served: Serve) -> list[dict[str, object]]:
    out = snapimg("snapshot", "list", "--control", served.control, "--json").stdout
    result: list[dict[str, object]] = json.loads(out)
    return result


def test_agent_that_never_answers_fails_in_one_line_and_freezes_nothing(
    served: Serve, silent_agent: Path
) -> None:
    proc = snapimg(
        "snapshot",
        "create",
        "--control",
        served.control,
        "disk@s1",
        "--quiesce",
        "--qga",
        silent_agent,
        "--quiesce-timeout",
        "1",
        check=False,
    )
    assert proc.returncode == 1
    assert _one_line(proc.stderr) == (
        f"snapimg snapshot: guest agent at {silent_agent}: guest-sync-delimited: no answer "
        "within 1 s (is qemu-guest-agent running in the guest?); nothing was frozen"
    )
    assert proc.stdout == ""
    assert _snapshots(served) == []


def test_backup_with_an_agent_that_never_answers(
    served: Serve, silent_agent: Path, tmp_path: Path
) -> None:
    target = tmp_path / "backups"
    proc = snapimg(
        "backup",
        "--control",
        served.control,
        "disk",
        "--to",
        target,
        "--quiesce",
        "--qga",
        silent_agent,
        "--quiesce-timeout",
        "1",
        check=False,
    )
    assert proc.returncode == 1
    assert "no answer within 1 s" in _one_line(proc.stderr)
    assert _snapshots(served) == []
    assert not list(target.glob("b*.raw"))


def test_thaw_with_an_agent_that_never_answers(silent_agent: Path) -> None:
    proc = snapimg("thaw", "--qga", silent_agent, "--timeout", "0.5", check=False)
    assert proc.returncode == 1
    assert _one_line(proc.stderr) == (
        f"snapimg thaw: guest agent at {silent_agent}: guest-sync-delimited: no answer within 0.5 s"
    )


def test_the_agents_error_class_reaches_the_user(host_agent: Path) -> None:
    proc = snapimg("thaw", "--qga", host_agent, check=False)  # thaw is blocked on the host
    assert proc.returncode == 1
    assert _one_line(proc.stderr) == (
        f"snapimg thaw: guest agent at {host_agent}: guest-fsfreeze-thaw: CommandNotFound: "
        "Command guest-fsfreeze-thaw has been disabled"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--qga", "x.sock"], "--qga goes with --quiesce"),
        (["--quiesce"], "--quiesce needs --qga SOCKET or --libvirt DOMAIN"),
    ],
)
def test_quiesce_option_mistakes(served: Serve, args: list[str], message: str) -> None:
    proc = snapimg("snapshot", "create", "--control", served.control, "disk@s1", *args, check=False)
    assert proc.returncode == 1
    assert _one_line(proc.stderr) == f"snapimg snapshot: {message}"
    assert _snapshots(served) == []


def test_quiesce_timeout_must_be_positive(served: Serve) -> None:
    proc = snapimg(
        "snapshot",
        "create",
        "--control",
        served.control,
        "disk@s1",
        "--quiesce",
        "--qga",
        "x.sock",
        "--quiesce-timeout",
        "0",
        check=False,
    )
    assert proc.returncode == 2
    assert "--quiesce-timeout: '0' is not a number of seconds" in _one_line(proc.stderr)


def test_no_server_means_nothing_is_frozen(tmp_path: Path, silent_agent: Path) -> None:
    """The control socket is checked before the agent is even asked."""
    proc = snapimg(
        "snapshot",
        "create",
        "--control",
        tmp_path / "none.sock",
        "disk@s1",
        "--quiesce",
        "--qga",
        silent_agent,
        "--quiesce-timeout",
        "1",
        check=False,
    )
    assert proc.returncode == 1
    assert "no snapimg server is running" in _one_line(proc.stderr)


@pytest.mark.parametrize("backend", ["native", "qsd"])
def test_quiesce_records_survive_a_restart_and_follow_the_snapshot(
    serve: Callable[..., Serve], tmp_path: Path, backend: str
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 * MIB))
    server = serve([f"disk={image}"], "--backend", backend)
    client = ControlClient(server.control)
    info, _ = client.create_snapshot(
        "disk", "q", max_size=None, writable=False, on_full="invalidate"
    )
    client.create_snapshot("disk", "plain", max_size=None, writable=False, on_full="invalidate")
    with pytest.raises(SnapshotError, match="was created at"):
        client.record_quiesce("disk", "q", 12, info.created + timedelta(seconds=1))
    noted = client.record_quiesce("disk", "q", 12, info.created)
    assert (noted.quiesced, noted.frozen_ms) == (True, 12)
    rows = {row["name"]: row for row in _snapshots(server)}
    assert (rows["disk@q"]["quiesced"], rows["disk@q"]["frozen_ms"]) == (True, 12)
    assert (rows["disk@plain"]["quiesced"], rows["disk@plain"]["frozen_ms"]) == (False, None)
    table = snapimg("snapshot", "list", "--control", server.control).stdout
    assert "frozen 12 ms" in table
    notes = json.loads((server.store / "quiesce.json").read_text())
    assert notes["snapshots"]["disk@q"] == {"created": info.created.isoformat(), "frozen_ms": 12}

    assert server.stop() == 143  # SIGTERM: clean shutdown, status 128 + 15
    server = serve([f"disk={image}"], "--backend", backend)  # same store dir
    rows = {row["name"]: row for row in _snapshots(server)}
    assert rows["disk@q"]["quiesced"] is True  # qsd: the snapshot is invalid now, still noted

    client = ControlClient(server.control)
    client.drop_snapshot("disk", "q")
    again, _ = client.create_snapshot(
        "disk", "q", max_size=None, writable=False, on_full="invalidate"
    )
    assert isinstance(again.created, datetime)
    rows = {row["name"]: row for row in _snapshots(server)}
    assert rows["disk@q"]["quiesced"] is False  # a new snapshot of the same name
    assert "disk@q" not in json.loads((server.store / "quiesce.json").read_text())["snapshots"]


def test_attach_with_an_agent_that_never_answers(silent_agent: Path, tmp_path: Path) -> None:
    """The agent is asked before QEMU is touched: no QMP socket is needed to fail here."""
    proc = snapimg(
        "attach",
        "--qmp",
        tmp_path / "no-qemu.qmp",
        "--device",
        "disk0",
        "vm@s",
        "--store-dir",
        tmp_path / "store",
        "--quiesce",
        "--qga",
        silent_agent,
        "--quiesce-timeout",
        "1",
        check=False,
    )
    assert proc.returncode == 1
    assert _one_line(proc.stderr).endswith(
        "no answer within 1 s (is qemu-guest-agent running in the guest?); nothing was frozen"
    )
    assert not (tmp_path / "store").exists()


def test_backup_quiesce_needs_an_agent(served: Serve, tmp_path: Path) -> None:
    proc = snapimg(
        "backup",
        "--control",
        served.control,
        "disk",
        "--to",
        tmp_path / "b",
        "--quiesce",
        check=False,
    )
    assert proc.returncode == 1
    assert _one_line(proc.stderr) == (
        "snapimg backup: --quiesce needs --qga SOCKET or --libvirt DOMAIN"
    )
    assert not (tmp_path / "b").exists()
