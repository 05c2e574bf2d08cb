"""Kill test: a child process writes through the engine, the parent SIGKILLs it at
random moments; after every kill the store must reopen with every snapshot equal to
the origin at its creation, and the origin must hold every write that returned."""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from snapimg.engine import Engine

BS = 4096
SIZE = 64 * BS + 300
ROUNDS = 60
CHILD = Path(__file__).with_name("kill_child.py")


def run_child(
    store: Path,
    origin: Path,
    durability: str,
    seed: int,
    rnd_no: int,
    life: float,
    after_open: bool,
) -> list[str]:
    """Start the child, SIGKILL it ``life`` seconds after its start (``after_open``:
    after it opened the engine), return its lines."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(store), str(origin), str(BS), durability,
         str(seed), str(rnd_no)],
        stdout=subprocess.PIPE, env=env, start_new_session=True,
    )  # fmt: skip
    first: list[bytes] = []
    try:
        assert proc.stdout is not None
        if after_open:
            first = [proc.stdout.readline(), proc.stdout.readline()]
        time.sleep(life)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the child died before it was killed"
    return (b"".join(first) + out).decode().splitlines()


def test_kill_at_random_moments(tmp_path: Path) -> None:
    rnd = random.Random(20261126)
    origin = tmp_path / "disk.img"
    store = tmp_path / "store"
    content = bytearray(rnd.randbytes(SIZE))
    origin.write_bytes(content)
    snaps: dict[str, bytes] = {}
    kills_mid_op = 0
    for rnd_no in itertools.count():
        # ROUNDS rounds, and more (up to 3x) while too few kills hit an operation: a loaded
        # machine runs fewer operations in the same random life
        if rnd_no >= ROUNDS and (kills_mid_op >= ROUNDS // 3 or rnd_no >= 3 * ROUNDS):
            break
        durability = "strict" if rnd_no % 3 == 0 else "default"
        after_open = rnd_no % 5 != 0  # every fifth kill may hit start-up and open
        life = rnd.uniform(0.0, 0.3) if after_open else rnd.uniform(0.1, 0.8)
        lines = run_child(
            store, origin, durability, rnd.randrange(1 << 30), rnd_no, life, after_open
        )
        pending: list[str] | None = None  # the operation in flight when killed
        for line in lines:
            if line.startswith("B "):
                pending = line[2:].split()
                continue
            assert line == "E" and pending is not None
            op = pending
            pending = None
            if op[0] == "write":
                off, length, val = map(int, op[1:])
                content[off : off + length] = bytes([val]) * length
            elif op[0] == "create":
                snaps[op[1]] = bytes(content)
            elif op[0] == "drop":
                del snaps[op[1]]
        kills_mid_op += pending is not None and pending[0] != "open"
        with Engine.open(store, {"d": origin}, BS) as eng:
            actual = eng.origin_device("d").pread(0, SIZE)
            infos = {i.snap: i for i in eng.snapshots()}
            if pending and pending[0] == "write":
                # an unacknowledged write may have landed in part
                off, length, val = map(int, pending[1:])
                assert actual[:off] == content[:off]
                assert actual[off + length :] == content[off + length :]
                for i in range(off, off + length):
                    assert actual[i] in (content[i], val), f"round {rnd_no} byte {i}"
            else:
                assert actual == content, f"round {rnd_no}: origin lost an acknowledged write"
            if pending and pending[0] == "create" and pending[1] in infos:
                snaps[pending[1]] = bytes(content)
            if pending and pending[0] == "drop" and pending[1] not in infos:
                del snaps[pending[1]]
            assert set(infos) == set(snaps), f"round {rnd_no}"
            for name, want in snaps.items():
                assert infos[name].valid, f"round {rnd_no}: {name} {infos[name].reason}"
                got = eng.snapshot_device("d", name).pread(0, SIZE)
                assert got == want, f"round {rnd_no}: snapshot {name} differs"
        content[:] = actual
    # the kills must have hit operations, not only process start-up
    assert kills_mid_op >= ROUNDS // 3
