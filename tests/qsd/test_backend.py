"""The qsd backend against a real qemu-storage-daemon and real NBD clients."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from qsd_clients import (
    MiB,
    copy_convert,
    copy_dd,
    copy_nbdcopy,
    make_origin,
    pread,
    qemu_io,
    read_file,
    same_bytes,
)

from snapimg.backends.config import ServeConfig
from snapimg.backends.qsd import QsdBackend, graph, start
from snapimg.errors import QemuError, SnapshotError, UsageError

SIZE = 64 * MiB
# QEMU's tests/qemu-iotests/tests/image-fleecing cases (disk contents, overwrites after the
# snapshot, zeroes written after the snapshot, untouched remainder).
PATTERNS = [
    (0x5D, 0, 0x10000),
    (0xD5, 0x100000, 0x10000),
    (0xDC, 0x2000000, 0x10000),
    (0xCD, 0x3FF0000, 0x10000),
]
OVERWRITES = [
    (0xAB, 0, 0x10000),  # full
    (0xAD, 0x00F8000, 0x10000),  # partial-left
    (0x1D, 0x2008000, 0x10000),  # partial-right
    (0xEA, 0x3FE0000, 0x10000),
]  # adjacent-left
ZEROES = [(0x00F8000, 0x8000), (0x2010000, 0x8000), (0x3FE0000, 0x10000)]


def run_async(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(fn())  # type: ignore[arg-type]


async def serve(
    tmp: Path,
    size: int = SIZE,
    patterns: list[tuple[int, int, int]] = PATTERNS,
    block_size: int = 65536,
) -> QsdBackend:
    origin = tmp / "disk.img"
    if not origin.exists():
        make_origin(origin, size, patterns)
    return await start(
        ServeConfig(
            {"disk": origin},
            socket=tmp / "nbd.sock",
            store_dir=tmp / "store",
            block_size=block_size,
        )
    )


def snapshot_reference(tmp: Path, name: str) -> Path:
    """The origin file as it is now (every write so far was acknowledged)."""
    ref = tmp / f"ref-{name}.img"
    shutil.copyfile(tmp / "disk.img", ref)
    return ref


def check_snapshot(
    b: QsdBackend, snap: str, ref: Path, tmp: Path, rewritten: list[tuple[int, int]]
) -> None:
    """Byte-exact through every client, and reads that start inside rewritten ranges."""
    uri = b.uri(f"disk@{snap}")
    for copy in (copy_convert, copy_dd, copy_nbdcopy):
        out = tmp / f"copy-{snap}-{copy.__name__}.img"
        copy(uri, out)
        assert same_bytes(out, ref), f"{copy.__name__} of disk@{snap} differs from the snapshot"
        out.unlink()
    for off, length in rewritten:
        start_ = off + length // 2  # inside the rewritten cluster, running past it
        n = min(3 * 65536, SIZE - start_)
        assert pread(uri, start_, n) == read_file(ref, start_, n)


def test_image_fleecing_cases_are_exact_through_every_client(short_tmp: Path) -> None:
    async def main() -> None:
        b = await serve(short_tmp)
        try:
            origin = b.uri("disk")
            ref = snapshot_reference(short_tmp, "s")
            info = await b.create_snapshot(
                "disk", "s", max_size=None, writable=False, on_full="block-writes"
            )
            assert info.valid and info.name == "disk@s"
            qemu_io(origin, *(f"write -P {p} {o} {n}" for p, o, n in OVERWRITES))
            qemu_io(origin, *(f"write -z {o} {n}" for o, n in ZEROES))
            qemu_io(
                origin,
                "write -z -u 0x100000 0x8000",  # zero + unmap (hole in origin)
                "discard 0x3FF0000 0x10000",
            )  # discard after the snapshot
            # The snapshot still reads the image-fleecing patterns, byte for byte.
            snap = b.uri("disk@s")
            for p, o, n in PATTERNS:
                qemu_io(snap, f"read -P {p} {o} {n}")
            rewritten = [(o, n) for _, o, n in OVERWRITES] + ZEROES + [(0x100000, 0x8000)]
            check_snapshot(b, "s", ref, short_tmp, rewritten)
            # The origin has the new data.
            qemu_io(
                origin,
                "read -P 0xab 0 0x10000",
                "read -P 0 0x3FE0000 0x10000",
                "read -P 0 0x100000 0x8000",
            )
            changed = await b.changed_ranges("disk", "s")
            covered = {c for o, n in changed for c in range(o // 65536, (o + n) // 65536)}
            touched = {c for o, n in rewritten for c in range(o // 65536, -(-(o + n) // 65536))}
            assert touched <= covered
            assert all(o % 65536 == 0 and n % 65536 == 0 for o, n in changed)
            [listed] = await b.list_snapshots()
            assert listed.valid and listed.preserved_bytes == 65536 * len(covered)
        finally:
            await b.close()

    run_async(main)


def test_several_snapshots_and_dropping_the_middle_one(short_tmp: Path) -> None:
    async def main() -> None:
        b = await serve(short_tmp, size=8 * MiB, patterns=[(0x11, 0, 8 * MiB)])
        origin = b.uri("disk")
        try:
            refs = {}
            writes = {
                "a": (0x21, 0, 3 * 65536),
                "b": (0x22, 65536, 3 * 65536),
                "c": (0x23, 0x8000, 5 * 65536),
            }
            for snap, (p, o, n) in writes.items():
                refs[snap] = snapshot_reference(short_tmp, snap)
                await b.create_snapshot(
                    "disk", snap, max_size=None, writable=False, on_full="invalidate"
                )
                qemu_io(origin, f"write -P {p} {o} {n}", f"write -z {o + n} 65536")
            before = await b.qmp.node_names()
            held = b.node_names_of("disk", "b")
            assert len(held) == 3 and held <= before
            await b.drop_snapshot("disk", "b")
            assert before - await b.qmp.node_names() == held
            assert "disk@b" not in {e.name for e in await b.exports()}
            qemu_io(origin, "write -P 0x24 0x10000 0x40000")  # still copied for a and c
            for snap in ("a", "c"):
                check_snapshot(b, snap, refs[snap], short_tmp, [(0x10000, 0x40000)])
            assert [s.snap for s in await b.list_snapshots()] == ["a", "c"]
            await b.drop_snapshot("disk", "c")
            await b.drop_snapshot("disk", "a")
            assert await b.qmp.node_names() == set(b.origins["disk"].node_names())
            assert await b.qmp.export_ids() == {"o1-exp"}
            assert not list((short_tmp / "store").glob("*.qcow2"))
        finally:
            await b.close()

    run_async(main)


def test_block_writes_fails_the_writer_and_keeps_the_snapshot_exact(short_tmp: Path) -> None:
    async def main() -> None:
        b = await serve(short_tmp, size=8 * MiB, patterns=[(0x31, 0, 8 * MiB)])
        origin = b.uri("disk")
        try:
            ref = snapshot_reference(short_tmp, "s")
            await b.create_snapshot(
                "disk", "s", max_size=MiB, writable=False, on_full="block-writes"
            )
            qemu_io(origin, "write -P 0x41 0 1M")  # fills the 1 MiB exactly
            out = qemu_io(origin, "write -P 0x42 4M 64k", expect_fail=True)
            assert "No space left on device" in out
            qemu_io(origin, "read -P 0x31 4M 64k")  # the failed write left nothing
            qemu_io(origin, "write -P 0x43 0 64k")  # already copied: allowed
            [info] = await b.list_snapshots()
            assert info.valid and info.reason is None
            assert info.preserved_bytes == MiB and info.max_size == MiB
            check_snapshot(b, "s", ref, short_tmp, [(0, MiB)])
        finally:
            await b.close()

    run_async(main)


def test_invalidate_keeps_the_writer_going_and_the_snapshot_answers_eio(short_tmp: Path) -> None:
    async def main() -> None:
        b = await serve(short_tmp, size=8 * MiB, patterns=[(0x51, 0, 8 * MiB)])
        origin = b.uri("disk")
        try:
            await b.create_snapshot("disk", "s", max_size=MiB, writable=False, on_full="invalidate")
            qemu_io(origin, "write -P 0x52 0 2M")  # writer never fails
            qemu_io(origin, "read -P 0x52 0 2M")
            [info] = await b.list_snapshots()
            assert not info.valid and info.reason and "max size" in info.reason
            # The export stays but answers EIO, never data; its fleecing graph is gone.
            out = qemu_io(b.uri("disk@s"), "read 0 64k", expect_fail=True)
            assert "Input/output error" in out
            assert "disk@s" in {e.name for e in await b.exports()}
            origin_nodes = set(b.origins["disk"].node_names())
            nodes = await b.qmp.node_names()
            assert nodes - origin_nodes == {
                n for n in nodes if n.endswith(("-dead", "-dbg", "-null"))
            }
            assert await b.qmp.execute("query-block-jobs") == []
            assert not list((short_tmp / "store").glob("*.qcow2"))
            with pytest.raises(SnapshotError, match="invalid"):
                await b.changed_ranges("disk", "s")
            await b.drop_snapshot("disk", "s")
            assert await b.list_snapshots() == []
            assert await b.qmp.node_names() == origin_nodes
            assert await b.qmp.export_ids() == {b.origins["disk"].export_id}
        finally:
            await b.close()

    run_async(main)


def test_restart_reports_lost_snapshots_and_clean_stop_leaves_nothing(short_tmp: Path) -> None:
    async def main() -> None:
        b = await serve(short_tmp, size=4 * MiB, patterns=[(0x61, 0, MiB)])
        rundir = b.daemon.rundir
        await b.create_snapshot("disk", "s", max_size=None, writable=False, on_full="invalidate")
        await b.close()
        assert not (short_tmp / "nbd.sock").exists() and not rundir.exists()
        assert not list((short_tmp / "store").glob("*.qcow2"))

        b = await serve(short_tmp, size=4 * MiB)
        try:
            [info] = await b.list_snapshots()
            assert info.name == "disk@s" and not info.valid
            assert info.reason is not None and "do not survive a restart" in info.reason
            assert "disk@s" in {e.name for e in await b.exports()}
            out = qemu_io(b.uri("disk@s"), "read 0 64k", expect_fail=True)
            assert "Input/output error" in out
            with pytest.raises(SnapshotError, match="already exists"):
                await b.create_snapshot(
                    "disk", "s", max_size=None, writable=False, on_full="invalidate"
                )
            await b.drop_snapshot("disk", "s")
            assert await b.qmp.node_names() == set(b.origins["disk"].node_names())
            await b.create_snapshot(
                "disk", "s", max_size=None, writable=False, on_full="invalidate"
            )
            assert (await b.list_snapshots())[0].valid
            qemu_io(b.uri("disk@s"), "read -P 0x61 0 1M")
        finally:
            await b.close()

    run_async(main)


def test_daemon_death_is_reported_and_cleaned_up(short_tmp: Path) -> None:
    async def main() -> None:
        b = await serve(short_tmp, size=4 * MiB, patterns=[])
        try:
            await b.create_snapshot(
                "disk", "s", max_size=None, writable=False, on_full="invalidate"
            )
            os.kill(b.daemon.pid, signal.SIGKILL)
            reason = await asyncio.wait_for(b.died(), 10)
            assert "qemu-storage-daemon" in reason and "died" in reason
            with pytest.raises(QemuError, match="not running"):
                await b.exports()
        finally:
            await b.close()
        assert not (short_tmp / "nbd.sock").exists()
        assert not list((short_tmp / "store").glob("*.qcow2"))

    run_async(main)


def test_qemu_errors_are_one_line_with_class_description_and_command(short_tmp: Path) -> None:
    async def main() -> None:
        b = await serve(short_tmp, size=4 * MiB, patterns=[])
        try:
            with pytest.raises(QemuError) as err:
                await b.qmp.execute("blockdev-del", {"node-name": "no-such-node"})
            text = str(err.value)
            assert text.startswith("QMP error GenericError: ") and "\n" not in text
            assert text.endswith("(command blockdev-del)") and "no-such-node" in text
            assert (err.value.error_class, err.value.command) == ("GenericError", "blockdev-del")
            assert "no-such-node" in err.value.desc and err.value.desc in text
            with pytest.raises(SnapshotError, match="unknown export"):
                await b.create_snapshot(
                    "nope", "s", max_size=None, writable=False, on_full="invalidate"
                )
            with pytest.raises(UsageError, match="writable"):
                await b.create_snapshot(
                    "disk", "s", max_size=None, writable=True, on_full="invalidate"
                )
        finally:
            await b.close()

    run_async(main)


def test_snapshot_point_in_time_under_a_running_writer(short_tmp: Path) -> None:
    """A writer fills blocks 0, 1, 2, ... in order: the snapshot holds exactly a prefix of
    them, including every write acknowledged before create started and none issued after
    it returned."""
    import threading

    import nbd

    block, count = 65536, 256

    async def main() -> None:
        b = await serve(short_tmp, size=count * block, patterns=[(0x01, 0, count * block)])
        acked: list[float] = []
        issued: list[float] = []
        h = nbd.NBD()
        h.connect_uri(b.uri("disk"))

        def writer() -> None:
            for i in range(count):
                issued.append(time.monotonic())
                h.pwrite(bytes([0xEE]) * block, i * block)
                acked.append(time.monotonic())

        try:
            t = threading.Thread(target=writer)
            t.start()
            while len(acked) < 20:
                await asyncio.sleep(0.001)
            before = time.monotonic()
            await b.create_snapshot(
                "disk", "s", max_size=None, writable=False, on_full="block-writes"
            )
            after = time.monotonic()
            await asyncio.to_thread(t.join)
            data = pread(b.uri("disk@s"), 0, count * block)
            written = [data[i * block] == 0xEE for i in range(count)]
            prefix = written.index(False) if False in written else count
            assert written == [True] * prefix + [False] * (count - prefix)
            assert all(
                data[i * block : (i + 1) * block] == bytes([0xEE]) * block for i in range(prefix)
            )
            assert all(
                data[i * block : (i + 1) * block] == bytes([0x01]) * block
                for i in range(prefix, count)
            )
            assert prefix >= sum(1 for t_ack in acked if t_ack < before)
            assert prefix <= sum(1 for t_iss in issued if t_iss < after)
        finally:
            h.shutdown()
            await b.close()

    run_async(main)


def test_a_fleecing_job_that_ends_behind_snapimgs_back_is_reported_invalid(short_tmp: Path) -> None:
    async def main() -> None:
        b = await serve(short_tmp, size=4 * MiB, patterns=[(0x71, 0, 4 * MiB)])
        try:
            await b.create_snapshot(
                "disk", "s", max_size=None, writable=False, on_full="block-writes"
            )
            [job] = await b.qmp.execute("query-block-jobs")
            await b.qmp.execute("block-job-cancel", {"device": job["device"], "force": True})
            deadline = time.monotonic() + 30  # the cancel returns before the job is gone
            while job["device"] in await graph.job_ids(b.qmp):
                assert time.monotonic() < deadline, "the cancelled job stayed"
                await asyncio.sleep(0.01)
            [info] = await b.list_snapshots()
            assert not info.valid and info.reason == "the QEMU fleecing job ended on its own"
            qemu_io(b.uri("disk@s"), "read 0 64k", expect_fail=True)
            qemu_io(b.uri("disk"), "write -P 0x72 0 64k")  # the origin still works
            await b.drop_snapshot("disk", "s")
            assert await b.qmp.node_names() == set(b.origins["disk"].node_names())
            assert await b.qmp.export_ids() == {b.origins["disk"].export_id}
        finally:
            await b.close()

    run_async(main)
