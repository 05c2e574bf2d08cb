"""``snapimg diff`` and ``snapimg checksum`` on sparse images, against cmp and sha256sum."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from snapimg.cli.main import main
from tests.inspect.helpers import MiB, run
from tests.listening import wait_listening

BS = 64 * 1024


def _sparse(path: Path, size: int, writes: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)


def _diff_json(
    a: Path | str, b: Path | str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    rc = main(["diff", "--json", str(a), str(b)])
    return rc, json.loads(capsys.readouterr().out)


def _cmp_blocks(a: Path, b: Path) -> set[int]:
    """Blocks holding a differing byte, by cmp -l (1-based byte numbers)."""
    proc = subprocess.run(["cmp", "-l", str(a), str(b)], capture_output=True, text=True)
    return {(int(line.split()[0]) - 1) // BS for line in proc.stdout.splitlines()}


def test_changed_ranges_are_the_blocks_cmp_finds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rnd = random.Random(3)
    base = [
        (0, rnd.randbytes(300_000)),
        (5 * MiB, rnd.randbytes(2 * MiB)),
        (20 * MiB, rnd.randbytes(4096)),
    ]
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    _sparse(a, 32 * MiB, base)
    changes = [
        (100, b"X"),  # inside the first data run
        (BS - 1, b"YZ"),  # straddles blocks 0 and 1: merges with the first
        (5 * MiB + 3 * BS, b"\x01" * BS),  # exactly one block, inside data
        (12 * MiB + 7, b"data in a hole"),  # data where a has a hole
        (20 * MiB, bytes(4096)),  # b zeroes what a had: a change
    ]
    _sparse(b, 32 * MiB, base + changes)
    rc, rep = _diff_json(a, b, capsys)
    assert rc == 1
    expected = _cmp_blocks(a, b)
    got = set()
    for r in rep["ranges"]:
        assert r["offset"] % BS == 0 and r["length"] % BS == 0
        got |= set(range(r["offset"] // BS, (r["offset"] + r["length"]) // BS))
    assert got == expected
    assert rep["changed_blocks"] == len(expected)
    assert rep["changed_bytes"] == len(expected) * BS
    # adjacent changed blocks are merged: blocks 0 and 1 are one range
    assert rep["ranges"][0] == {"offset": 0, "length": 2 * BS}
    assert len(rep["ranges"]) == 4
    assert rep["identical"] is False

    rc, rep = _diff_json(a, a, capsys)
    assert rc == 0 and rep["ranges"] == [] and rep["identical"] is True


def test_hole_equals_written_zeroes_and_sizes_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, c = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.img"
    _sparse(a, 8 * MiB, [(MiB, b"same")])
    _sparse(b, 8 * MiB, [(0, bytes(4 * MiB)), (MiB, b"same")])  # zeroes written, not a hole
    assert subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0
    rc, rep = _diff_json(a, b, capsys)
    assert rc == 0 and rep["identical"]

    _sparse(c, 8 * MiB + 100, [(MiB, b"same")])
    rc, rep = _diff_json(a, c, capsys)
    assert rc == 1
    assert rep["size_a"] == 8 * MiB and rep["size_b"] == 8 * MiB + 100
    assert rep["ranges"] == [{"offset": 8 * MiB, "length": 100}]


def test_diff_error_exits_2(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    _sparse(img, MiB, [])
    proc = subprocess.run(
        [sys.executable, "-m", "snapimg.cli.main", "diff", str(img), str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "missing" in proc.stderr


def test_checksum_equals_coreutils(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rnd = random.Random(5)
    img = tmp_path / "a.img"
    _sparse(img, 40 * MiB + 512, [(3, rnd.randbytes(9 * MiB)), (30 * MiB, rnd.randbytes(777))])
    for algo in ("sha256", "md5", "sha512"):
        assert main(["checksum", "--algo", algo, str(img)]) == 0
        out, err = capsys.readouterr()
        assert out == run(f"{algo}sum", img)
        assert err == ""  # not a TTY: quiet


def _pieces_rule(path: Path) -> str:
    """sha256-pieces written out from the contract: SHA-256 over the 4 MiB pieces' SHA-256."""
    outer = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(4 * MiB):
            outer.update(hashlib.sha256(piece).digest())
    return outer.hexdigest()


def test_checksum_pieces_is_one_digest_for_raw_qcow2_and_nbd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], qsd_export: Any
) -> None:
    rnd = random.Random(6)
    img = tmp_path / "a.img"
    # data across piece boundaries, a whole-piece hole, allocated zeroes, a short last piece
    _sparse(
        img,
        26 * MiB + 512,
        [(4 * MiB - 7, rnd.randbytes(MiB)), (13 * MiB, bytes(MiB)), (26 * MiB, rnd.randbytes(512))],
    )
    want = _pieces_rule(img)
    qcow2 = tmp_path / "a.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", img, qcow2)
    for target in (str(img), str(qcow2), qsd_export(img).uri):
        assert main(["checksum", "--pieces", target]) == 0
        assert capsys.readouterr().out == f"{want}  {target}\n"
    assert main(["checksum", "--pieces", "--json", str(qcow2)]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "target": str(qcow2),
        "size": 26 * MiB + 512,
        "algo": "sha256-pieces",
        "digest": want,
        "digest_rule": {"name": "sha256-pieces", "piece_size": 4 * MiB},
    }
    assert main(["checksum", "--json", "--algo", "md5", str(img)]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "target": str(img),
        "size": 26 * MiB + 512,
        "algo": "md5",
        "digest": run("md5sum", img).split()[0],
    }


def test_checksum_unknown_algo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "a.img"
    _sparse(img, MiB, [])
    assert main(["checksum", "--algo", "crc99", str(img)]) == 1
    assert "unknown digest 'crc99'" in capsys.readouterr().err


def test_progress_bar_on_a_tty_for_slow_work(tmp_path: Path) -> None:
    """nbdkit's delay filter makes each 4 MiB read take 0.3 s: 4 reads last > 1.2 s."""
    sock = tmp_path / "slow.sock"
    nbdkit = subprocess.Popen(
        ["nbdkit", "-f", "-U", str(sock), "--filter=delay", "pattern", "size=16M", "rdelay=300ms"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_listening(sock, nbdkit, "nbdkit", timeout=10)
        uri = f"nbd+unix:///?socket={sock}"
        pid, fd = pty.fork()
        if pid == 0:  # child: stdout and stderr are the pty
            os.execv(sys.executable, [sys.executable, "-m", "snapimg.cli.main", "checksum", uri])
        out = b""
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        text = out.decode()
        assert "checksum [" in text and "%" in text  # the bar was drawn
        assert "\x1b[K" in text  # and erased at the end
        pattern = b"".join(i.to_bytes(8, "big") for i in range(0, 16 * MiB, 8))
        assert hashlib.sha256(pattern).hexdigest() in text
    finally:
        os.killpg(nbdkit.pid, 15)
        nbdkit.wait()
        shutil.rmtree(tmp_path, ignore_errors=True)
