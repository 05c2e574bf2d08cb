"""Inspecting live NBD exports: a qemu-storage-daemon export of an image, and a snapshot
served by ``snapimg serve`` while its origin is being overwritten."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbd
import pytest

from snapimg.cli.main import main
from tests.inspect.helpers import GptDisk, NbdExport, inspect_json, run
from tests.interop.serving import Serve

SNAPIMG = [sys.executable, "-m", "snapimg.cli.main"]


def _same_disk(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in (
        "virtual_size",
        "partition_table",
        "partitions",
        "filesystem",
        "allocation",
        "findings",
    ):
        assert a[key] == b[key], key


def test_qsd_export_reads_like_the_file(
    gpt_disk: GptDisk,
    qsd_export: Callable[[Path], NbdExport],
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    exp = qsd_export(gpt_disk.path)
    over_nbd: dict[str, Any] = inspect_json(exp.uri, capfdbinary)
    from_file: dict[str, Any] = inspect_json(gpt_disk.path, capfdbinary)
    assert over_nbd["kind"] == "nbd" and from_file["kind"] == "image"
    _same_disk(over_nbd, from_file)  # allocation too: block status = SEEK_DATA here

    capfdbinary.readouterr()
    assert main(["cat", f"{exp.uri}:2", "/dir/nested/big.bin"]) == 0
    assert capfdbinary.readouterr().out == gpt_disk.ext_files["dir/nested/big.bin"]

    assert main(["checksum", exp.uri]) == 0
    assert (
        capfdbinary.readouterr().out.split()[0].decode()
        == run("sha256sum", gpt_disk.path).split()[0]
    )

    assert main(["diff", exp.uri, str(gpt_disk.path)]) == 0


@pytest.fixture
def served(gpt_disk: GptDisk, tmp_path: Path, serve: Callable[..., Serve]) -> tuple[Serve, Path]:
    image = tmp_path / "vm.img"
    shutil.copyfile(gpt_disk.path, image)
    return serve([f"disk={image}"]), image


def test_live_snapshot_keeps_its_filesystems_while_the_origin_changes(
    gpt_disk: GptDisk,
    served: tuple[Serve, Path],
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    s, _ = served
    before: dict[str, Any] = inspect_json(gpt_disk.path, capfdbinary)
    snap_uri = subprocess.run(
        [
            *SNAPIMG,
            "snapshot",
            "create",
            "--control",
            str(s.control),
            "disk@s1",
            "--max-size",
            "4M",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert snap_uri == s.uri("disk@s1")

    subprocess.run(
        [
            *SNAPIMG,
            "snapshot",
            "create",
            "--control",
            str(s.control),
            "disk@tiny",
            "--max-size",
            "128K",
        ],
        capture_output=True,
        text=True,
        check=True,
    )

    # Wipe the start of partition 1 (its FAT boot sector and FATs) on the live origin:
    # s1 preserves that 1 MiB; tiny cannot (128K) and is invalidated.
    fat_start = before["partitions"][0]["start"]
    h = nbd.NBD()
    h.connect_uri(s.uri("disk"))
    h.pwrite(b"\xaa" * (1 << 20), fat_start)
    h.flush()
    h.shutdown()

    snap: dict[str, Any] = inspect_json(snap_uri, capfdbinary)
    origin: dict[str, Any] = inspect_json(s.uri("disk"), capfdbinary)
    assert snap["partitions"] == before["partitions"]
    assert snap["partitions"][0]["filesystem"]["label"] == "FATVOL"
    assert origin["partitions"][0]["filesystem"] is None  # wiped on the origin
    assert origin["partitions"][1:] == before["partitions"][1:]

    capfdbinary.readouterr()
    assert main(["cat", f"{snap_uri}:1", "/A long file name.bin"]) == 0
    assert capfdbinary.readouterr().out == gpt_disk.fat_files["A long file name.bin"]

    assert main(["checksum", snap_uri]) == 0
    expected = hashlib.sha256(gpt_disk.path.read_bytes()).hexdigest()
    assert capfdbinary.readouterr().out.split()[0].decode() == expected

    capfdbinary.readouterr()
    assert main(["diff", "--json", snap_uri, s.uri("disk")]) == 1
    rep = json.loads(capfdbinary.readouterr().out)
    assert rep["ranges"] == [{"offset": fat_start, "length": 1 << 20}]

    # The store directory, inspected while snapimg serve has it open, then after it stopped.
    listed = json.loads(
        subprocess.run(
            [*SNAPIMG, "snapshot", "list", "--control", str(s.control), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    store: dict[str, Any] = inspect_json(s.store, capfdbinary)
    assert store["kind"] == "store" and store["in_use_by_pid"] == s.proc.pid
    assert store["block_size"] == 65536
    [origin] = store["origins"]
    assert origin["name"] == "disk" and origin["size"] == before["virtual_size"]
    for mine, theirs in zip(origin["snapshots"], listed, strict=True):
        assert {k: mine[k] for k in theirs} == theirs
    s1, tiny = origin["snapshots"]
    assert s1["snapshot"] == "s1" and s1["state"] == "valid"
    assert s1["preserved_bytes"] == 1 << 20 and s1["fill_percent"] == 25.0
    assert tiny["snapshot"] == "tiny" and tiny["state"] == "invalid" and tiny["reason"]
    capfdbinary.readouterr()
    assert main(["inspect", str(s.store)]) == 0
    table = capfdbinary.readouterr().out.decode()
    assert "in use by pid" in table and tiny["reason"].split(" (at ")[0] in table
    s.stop()
    closed: dict[str, Any] = inspect_json(s.store, capfdbinary)
    assert closed["in_use_by_pid"] is None and closed["clean"] is True
    assert closed["origins"] == store["origins"]
