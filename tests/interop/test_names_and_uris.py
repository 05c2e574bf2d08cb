"""The one name rule (snapimg.names) and the NBD URIs snapimg prints.

The CLI, the control socket and the library refuse the same names with the same
message; every name the rule allows, URI-reserved characters included, prints as a
percent-encoded URI that nbdinfo, qemu-img and snapimg itself read back.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from snapimg.engine import Engine
from snapimg.errors import UsageError
from snapimg.names import (
    MAX_NAME_BYTES,
    RULE,
    check_export_name,
    check_snapshot_name,
    split_snapshot_name,
)
from snapimg.nbd.uri import unix_uri
from tests.interop.qemu_tools import run
from tests.interop.serving import Serve, snapimg

MiB = 1 << 20
RESERVED = ":?#[]!$&'()*+,;=%"  # RFC 3986 gen-delims and sub-delims but '@' and '/', and '%'

GOOD = [
    "monday",
    "with space",
    f"all{RESERVED}",
    "a?b",
    "é-ü-日本",
    "x" * MAX_NAME_BYTES,
    "é" * (MAX_NAME_BYTES // 2),
    "-dash",
]
BAD = [
    "",
    " ",
    "  ",
    " lead",
    "trail ",
    "a@b",
    "a/b",
    "tab\there",
    "new\nline",
    "nul\0",
    "nbsp\u00a0inside",
    "x" * (MAX_NAME_BYTES + 1),
    "é" * (MAX_NAME_BYTES // 2 + 1),
]


def control_request(path: Path, method: str, **params: Any) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.sendall(json.dumps({"id": 7, "method": method, "params": params}).encode() + b"\n")
        line = sock.makefile("rb").readline()
    response: dict[str, Any] = json.loads(line)
    assert response["id"] == 7
    return response


def library_error(img: Path, snap: str) -> str:
    with Engine.open(None, {"disk": img}) as eng, pytest.raises(UsageError) as exc:
        eng.create_snapshot("disk", snap)
    return str(exc.value)


def test_rule() -> None:
    for name in GOOD:
        assert check_snapshot_name(name) == name
    for name in BAD:
        with pytest.raises(UsageError) as exc:
            check_snapshot_name(name)
        assert str(exc.value).endswith(RULE) and "\n" not in str(exc.value)
    assert split_snapshot_name("d@with space") == ("d", "with space")
    for text in ("nosep", "@s", "d@", "d@a@b", "d @s"):
        with pytest.raises(UsageError):
            split_snapshot_name(text)
    assert split_snapshot_name("d@ ", existing=True) == ("d", " ")  # old names can go
    long = "x" * 5000
    with pytest.raises(UsageError) as exc:
        check_snapshot_name(long)
    assert len(str(exc.value)) < 300  # a huge name is cut in the message


@pytest.mark.parametrize("backend", ["native", "qsd"])
def test_cli_control_and_library_refuse_alike(
    tmp_path: Path, serve: Callable[..., Serve], backend: str
) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * MiB)
    s = serve([f"disk={img}"], "--backend", backend)
    for name in BAD:
        with pytest.raises(UsageError) as exc:
            check_snapshot_name(name)
        message = str(exc.value)
        if name != name.replace("\0", ""):  # a NUL cannot be an argv string
            cli = None
        else:
            cli = snapimg("snapshot", "create", "--control", s.control, f"disk@{name}", check=False)
            assert cli.returncode == 1 and cli.stderr == f"snapimg snapshot: {message}\n"
        response = control_request(s.control, "create_snapshot", origin="disk", snap=name)
        assert response["error"] == {"type": "UsageError", "message": message}
        if backend == "native":
            assert library_error(img, name) == message
    listed = json.loads(snapimg("snapshot", "list", "--control", s.control, "--json").stdout)
    assert listed == []
    assert s.stop() == 143


def test_every_command_refuses_a_bad_name_alike(tmp_path: Path) -> None:
    """serve, backup and attach judge names by the same rule as snapshot create: the
    rule's own message, before anything is started or connected."""
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * MiB)
    nowhere = str(tmp_path / "no.sock")
    for name in BAD:
        if "\0" in name:  # a NUL cannot be an argv string
            continue
        with pytest.raises(UsageError) as exc:
            check_snapshot_name(name)
        snap_message = str(exc.value)
        with pytest.raises(UsageError) as exc:
            check_export_name(name)
        export_message = str(exc.value)
        runs = [
            (["backup", "--control", nowhere, name, "--to", tmp_path / "b"], export_message),
            (
                [
                    "backup",
                    "--control",
                    nowhere,
                    "disk",
                    "--keep",
                    f"disk@{name}",
                    "--to",
                    tmp_path / "b",
                ],
                snap_message,
            ),
            (["attach", "--qmp", nowhere, "--device", "ide0", f"disk@{name}"], snap_message),
        ]
        if "/" not in name:  # serve reads a NAME=IMAGE with '/' in NAME as an image path
            spec = f"{name}={img}"
            runs.append(
                (
                    [
                        "serve",
                        spec,
                        "--socket",
                        nowhere,
                        "--control",
                        nowhere,
                        "--store-dir",
                        tmp_path / "st",
                    ],
                    f"{export_message} (in {spec!r}; give NAME=IMAGE)",
                )
            )
        for args, message in runs:
            proc = snapimg(*args, check=False)
            assert (proc.returncode, proc.stdout) == (1, ""), (args, proc)
            assert proc.stderr == f"snapimg {args[0]}: {message}\n", args
    assert not (tmp_path / "b").exists() and not (tmp_path / "st").exists()


@pytest.mark.parametrize("backend", ["native", "qsd"])
def test_every_allowed_name_round_trips(
    tmp_path: Path, serve: Callable[..., Serve], backend: str
) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(range(256)) * (4 * MiB // 256))
    digest = hashlib.sha256(img.read_bytes()).hexdigest()
    # the origin's export name may use them too, but '=' (NAME=IMAGE ends NAME at the first)
    origin = f"d {RESERVED.replace('=', '')}é"
    s = serve([f"{origin}={img}"], "--backend", backend)
    for snap in GOOD:
        name = f"{origin}@{snap}"
        out = snapimg("snapshot", "create", "--control", s.control, name, "--json").stdout
        created = json.loads(out)
        uri = created["uri"]
        assert created["name"] == name and uri == unix_uri(name, s.socket)
        assert " " not in uri and "#" not in uri and "?" not in uri.split("?socket=")[0]
        info = json.loads(run("nbdinfo", "--json", uri).stdout)
        assert info["exports"][0]["export-name"] == name
        assert info["exports"][0]["export-size"] == 4 * MiB
        qemu = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
        assert qemu["virtual-size"] == 4 * MiB
        assert snapimg("checksum", uri).stdout.split()[0] == digest
    listing = json.loads(run("nbdinfo", "--json", "--list", unix_uri("", s.socket)).stdout)
    exports = {e["export-name"] for e in listing["exports"]}
    assert exports == {origin, *(f"{origin}@{snap}" for snap in GOOD)}
    assert s.stop() == 143


def test_socket_path_with_reserved_characters(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\x5a" * MiB)
    workdir = tmp_path / "s &#?%="  # the socket's directory: a query value to encode
    workdir.mkdir()
    s = Serve(workdir, [f"disk={img}"])
    try:
        uri = snapimg("snapshot", "create", "--control", s.control, "disk@s").stdout.strip()
        assert uri == unix_uri("disk@s", s.socket) and "s%20%26%23%3F%25%3D/nbd.sock" in uri
        assert run("nbdinfo", "--size", uri).stdout.strip() == str(MiB)
        assert '"virtual-size": 1048576' in run("qemu-img", "info", "--output=json", uri).stdout
        assert snapimg("checksum", uri).returncode == 0
    finally:
        s.stop()
        s.kill()
