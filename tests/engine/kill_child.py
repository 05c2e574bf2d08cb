"""Child of test_engine_kill: writes through the engine until it is killed.

Prints one line per operation to stdout, ``B <op>`` before and ``E`` after it
returned, so the parent knows which operations were acknowledged.
Usage: kill_child.py STORE ORIGIN BLOCK_SIZE DURABILITY SEED ROUND
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from snapimg.engine import Engine


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    store, origin, bs, durability, seed, rnd_no = sys.argv[1:7]
    block_size = int(bs)
    rnd = random.Random(int(seed))
    say("B open")
    eng = Engine.open(Path(store), {"d": Path(origin)}, block_size, durability)  # type: ignore[arg-type]
    say("E")
    dev = eng.origin_device("d")
    size = dev.size
    made = 0
    while True:
        names = [s.snap for s in eng.snapshots()]
        r = rnd.random()
        if r < 0.08 and len(names) < 5:
            made += 1
            name = f"r{rnd_no}n{made}"
            say(f"B create {name}")
            eng.create_snapshot("d", name)
        elif r < 0.12 and names:
            name = rnd.choice(names)
            say(f"B drop {name}")
            eng.drop_snapshot("d", name)
        elif r < 0.14:
            say("B flush")
            eng.flush()
        else:
            off = rnd.randrange(size)
            length = min(size - off, rnd.randrange(1, 4 * block_size))
            val = rnd.randrange(256)
            say(f"B write {off} {length} {val}")
            dev.pwrite(off, bytes([val]) * length, fua=rnd.random() < 0.1)
        say("E")


if __name__ == "__main__":
    main()
