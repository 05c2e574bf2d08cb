"""QEMU-compatible image locks (snapimg.imagelock) against QEMU's own tools and a real VM.

While ``snapimg serve`` holds an image, qemu-io, qemu-img and qemu-system-x86_64 opening
it for writing fail with QEMU's own 'Failed to get "write" lock'; read-only inspection
QEMU allows (``qemu-img info -U``, ``qemu-io -r``) still works; serve refuses an image a
running VM or another snapimg holds, and the same image twice in one command.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapimg.errors import ImageInUseError
from snapimg.imagelock import ImageLock, Perm, check_not_in_use, probe
from tests.interop.qemu_tools import qemu_io, run
from tests.interop.serving import Serve, snapimg

MiB = 1 << 20
WRITE_LOCK = 'Failed to get "write" lock'


def make_image(path: Path, size: int = 8 * MiB) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def qemu_writers(img: Path) -> dict[str, list[str]]:
    """QEMU programs that open ``img`` for writing, each as a command line."""
    return {
        "qemu-io": ["qemu-io", "-f", "raw", "-c", "write -P 0x11 1M 64K", str(img)],
        "qemu-img": ["qemu-img", "resize", "-f", "raw", str(img), "16M"],
        "qemu-system-x86_64": [
            "qemu-system-x86_64",
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "pc,accel=tcg",
            "-S",
            "-monitor",
            "none",
            "-drive",
            f"file={img},format=raw,if=ide",
        ],  # fmt: skip
    }


def assert_qemu_cannot_write(img: Path) -> None:
    before = img.read_bytes()
    for name, cmd in qemu_writers(img).items():
        # the VM would run forever if it got the lock: the timeout then fails the test
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"{name} opened a locked image for writing: {out}"
        assert WRITE_LOCK in out, f"{name}: {out}"
    assert img.read_bytes() == before and img.stat().st_size == len(before)


def assert_read_only_inspection_works(img: Path) -> None:
    info = run("qemu-img", "info", "-U", "--output=json", str(img)).stdout
    assert f'"virtual-size": {img.stat().st_size}' in info
    qemu_io(str(img), "read 0 64k", read_only=True)


class Vm:
    """A qemu-system-x86_64 (no guest, paused) with ``img`` as its IDE disk."""

    def __init__(self, img: Path) -> None:
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-machine", "pc,accel=tcg",
             "-S", "-monitor", "none", "-drive", f"file={img},format=raw,if=ide"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not probe(img).writer:  # QEMU takes its locks while it opens the drive
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the VM did not lock {img}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture
def vm() -> Iterator[Callable[[Path], Vm]]:
    started: list[Vm] = []

    def start(img: Path) -> Vm:
        v = Vm(img)
        started.append(v)
        return v

    yield start
    for v in started:
        v.stop()


def test_lock_stops_qemu_writers_and_allows_inspection(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img")
    assert not probe(img).in_use
    with ImageLock.acquire(img) as lock:
        assert lock.held
        state = probe(img)
        assert state.held == Perm.CONSISTENT_READ | Perm.WRITE
        assert state.unshared == Perm.WRITE | Perm.RESIZE
        assert [h.pid for h in state.holders] == [os.getpid()]
        assert_qemu_cannot_write(img)
        assert_read_only_inspection_works(img)
        with pytest.raises(ImageInUseError) as exc:  # a second holder, even in this process
            ImageLock.acquire(img)
        assert exc.value.permission == "write" and WRITE_LOCK in str(exc.value)
    assert not probe(img).in_use
    run(*qemu_writers(img)["qemu-io"])  # released: QEMU writes again


def test_a_running_vm_is_seen_and_refused(tmp_path: Path, vm: Callable[[Path], Vm]) -> None:
    img = make_image(tmp_path / "vm.img")
    guest = vm(img)
    state = probe(img)
    assert state.writer and state.unshared & Perm.WRITE
    assert [(h.pid, h.command) for h in state.holders] == [(guest.proc.pid, "qemu-system-x86_64")]
    with pytest.raises(ImageInUseError) as used:  # what restore --to asks before writing
        check_not_in_use(img)
    assert str(used.value) == (
        f"image {img} is in use by qemu-system-x86_64 (pid {guest.proc.pid}) "
        "(held: consistent read, write; not shared: write)"
    )
    with pytest.raises(ImageInUseError) as exc:
        ImageLock.acquire(img)
    assert exc.value.holders == state.holders
    assert str(exc.value) == (
        f"image {img} is in use by qemu-system-x86_64 (pid {guest.proc.pid}): {WRITE_LOCK}"
    )
    # snapimg serve refuses it with that line, creating nothing
    base = ["--socket", tmp_path / "n.sock", "--control", tmp_path / "c.sock"]
    proc = snapimg("serve", img, *base, "--store-dir", tmp_path / "store", check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"snapimg serve: {exc.value}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.img"]
    guest.stop()
    assert not probe(img).in_use
    check_not_in_use(img)


@pytest.mark.parametrize("backend", ["native", "qsd"])
def test_served_image_is_locked(tmp_path: Path, serve: Callable[..., Serve], backend: str) -> None:
    img = make_image(tmp_path / "disk.img")
    other = make_image(tmp_path / "other.img")
    s = serve([f"disk={img}", f"other={other}"], "--backend", backend)
    for path in (img, other):
        state = probe(path)
        assert state.writer and state.unshared == Perm.WRITE | Perm.RESIZE
        assert [(h.pid, h.command) for h in state.holders] == [(s.proc.pid, "snapimg")]
    assert_qemu_cannot_write(img)
    assert_read_only_inspection_works(img)
    qemu_io(s.uri("disk"), "write -P 0x22 0 64k")  # through snapimg: fine
    # A second snapimg on the same image (another store, other sockets) is refused.
    proc = snapimg(
        "serve", img, "--socket", tmp_path / "n2.sock", "--control", tmp_path / "c2.sock",
        "--store-dir", tmp_path / "store2", "--backend", backend, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"in use by snapimg (pid {s.proc.pid}): {WRITE_LOCK}" in proc.stderr
    assert not (tmp_path / "store2").exists()
    assert s.stop() == 143
    assert not probe(img).in_use and not probe(other).in_use
    run(*qemu_writers(img)["qemu-io"])


def test_same_image_twice_is_refused(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img")
    os.link(img, tmp_path / "hard.img")
    (tmp_path / "sym.img").symlink_to(img)
    (tmp_path / "sub").mkdir()
    base = ["--socket", tmp_path / "n.sock", "--control", tmp_path / "c.sock",
            "--store-dir", tmp_path / "store"]  # fmt: skip
    for second in (img, tmp_path / "hard.img", tmp_path / "sym.img", tmp_path / "sub/../d.img"):
        proc = snapimg("serve", f"a={img}", f"b={second}", *base, check=False)
        assert proc.returncode == 1
        assert proc.stderr == (
            f"snapimg serve: image {second} is given twice: export 'b' and export 'a' "
            "would be the same file\n"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.img", "hard.img", "sub", "sym.img"]
