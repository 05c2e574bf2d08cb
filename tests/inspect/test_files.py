"""``snapimg ls`` and ``snapimg cat`` inside FAT16 and ext4 partitions of a GPT image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from snapimg.cli.main import main
from tests.inspect.helpers import GptDisk, run


def _cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "snapimg.cli.main", *args], capture_output=True, check=False
    )


def _cat(capfdbinary: pytest.CaptureFixture[bytes], target: str, path: str) -> bytes:
    capfdbinary.readouterr()
    assert main(["cat", target, path]) == 0
    return capfdbinary.readouterr().out


def test_cat_returns_every_file_byte_for_byte(
    gpt_disk: GptDisk, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    img = str(gpt_disk.path)
    for name, data in gpt_disk.fat_files.items():
        assert _cat(capfdbinary, f"{img}:1", "/" + name) == data
    for name, data in gpt_disk.ext_files.items():
        assert _cat(capfdbinary, f"{img}:2", name) == data
    for name, data in gpt_disk.ntfs_files.items():
        assert _cat(capfdbinary, f"{img}:3", name) == data


def test_default_volume_is_the_first_filesystem(
    gpt_disk: GptDisk, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert _cat(capfdbinary, str(gpt_disk.path), "HELLO.TXT") == gpt_disk.fat_files["HELLO.TXT"]
    # through the real entry point too: bytes on stdout unchanged
    proc = _cli("cat", str(gpt_disk.path) + ":2", "/dir/nested/big.bin")
    assert proc.returncode == 0 and proc.stdout == gpt_disk.ext_files["dir/nested/big.bin"]


def test_ls_lists_like_the_native_tools(
    gpt_disk: GptDisk, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["ls", "--json", f"{gpt_disk.path}:1", "/"]) == 0
    fat = {e["name"]: e for e in json.loads(capsys.readouterr().out)["entries"]}
    assert set(fat) == {"HELLO.TXT", "A long file name.bin", "SUB"}
    assert fat["SUB"]["kind"] == "dir"
    assert fat["A long file name.bin"]["size"] == 70_000
    # mdir's view of the same directory: the same long names
    mdir = run("mdir", "-i", gpt_disk.part_images[1], "::/")
    assert "A long file name.bin" in mdir

    assert main(["ls", "--json", f"{gpt_disk.path}:2", "/dir/nested"]) == 0
    ext = json.loads(capsys.readouterr().out)["entries"]
    assert [(e["name"], e["kind"], e["size"]) for e in ext] == [("big.bin", "file", 1_300_000)]
    debugfs = run("debugfs", "-R", "ls -l /dir/nested", gpt_disk.part_images[2])
    assert "1300000" in debugfs and "big.bin" in debugfs

    assert main(["ls", "--json", f"{gpt_disk.path}:3"]) == 0
    ntfs = json.loads(capsys.readouterr().out)["entries"]
    assert [(e["name"], e["kind"], e["size"]) for e in ntfs] == [
        ("data.bin", "file", 200_000),
        ("notes.txt", "file", 17),
    ]  # no $MFT and friends
    ntfsls = run("ntfsls", gpt_disk.part_images[3]).split()
    assert sorted(ntfsls) == ["data.bin", "notes.txt"]

    assert main(["ls", f"{gpt_disk.path}:2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["TYPE", "SIZE", "MODIFIED", "NAME"]
    names = [line.split()[-1] for line in out[1:]]
    assert names == ["dir/", "hello.txt", "lost+found/"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("cat", "{img}:2", "/nope"), "/nope: no such file or directory"),
        (("cat", "{img}:2", "/dir"), "/dir: is a directory"),
        (("ls", "{img}:2", "/hello.txt/x"), "/hello.txt/x: not a directory"),
        (("ls", "{img}:2", "/nothing/here"), "/nothing/here: no such file or directory"),
        (("ls", "{img}:9", "/"), "has no partition 9"),
        (("cat", "{img}:3", "/missing.txt"), "/missing.txt: no such file or directory"),
    ],
)
def test_mistakes_are_one_line_errors(
    gpt_disk: GptDisk, args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([a.format(img=gpt_disk.path) for a in args]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and message in err
    assert out == ""


def test_partition_suffix_on_a_plain_path(tmp_path: Path) -> None:
    from snapimg.inspect.target import split_part

    odd = tmp_path / "a:1"
    odd.write_bytes(b"")
    assert split_part(str(odd)) == (str(odd), None)
    assert split_part(f"{tmp_path}/disk.img:3") == (f"{tmp_path}/disk.img", 3)
    assert split_part("nbd://localhost:10809") == ("nbd://localhost:10809", None)
    assert split_part("nbd://localhost:10809/snap:2") == ("nbd://localhost:10809/snap", 2)
    sock = "nbd+unix:///d@s1?socket=/run/x.sock"
    assert split_part(sock + ":1") == (sock, 1)
