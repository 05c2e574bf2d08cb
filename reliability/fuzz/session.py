"""One fuzzing session from the outside: the fuzzing process (reliability.fuzz.run), a
second client writing and reading the same server meanwhile, and a final check of the
store after the fuzzing process ended.

The second client is a separate process's libnbd (this one): on export ``check`` it
writes random data at random places, reads back and compares with its model; on
``check@c`` it reads and compares with the snapshot's creation content.  Fuzzed
connections share the engine, its store and the server with it, so a request that
corrupted anything beyond its own connection shows up here.  After the fuzzing process
exited, the store is reopened: every snapshot valid, ``fuzz@s`` and ``check@c`` exact.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbd

from reliability.fuzz.host import BLOCK, SIZE, origin_content
from snapimg.engine import Engine


@dataclass
class SecondClient:
    ops: int = 0  # verified reads and writes
    mismatches: list[str] = field(default_factory=list)
    ended: str = ""

    def run(self, sock: Path, stop: threading.Event, seed: int = 1, pause: float = 0.005) -> None:
        rng = random.Random(seed)
        model = bytearray(origin_content("check"))
        frozen = bytes(model)
        h, s = nbd.NBD(), nbd.NBD()
        try:
            h.set_export_name("check")
            h.connect_unix(str(sock))
            s.set_export_name("check@c")
            s.connect_unix(str(sock))
            while not stop.is_set():
                off, n = rng.randrange(SIZE), rng.randrange(1, 3 * BLOCK)
                n = min(n, SIZE - off)
                data = rng.randbytes(n)
                h.pwrite(data, off)
                model[off : off + n] = data
                if rng.random() < 0.2:
                    h.flush()
                off, n = rng.randrange(SIZE), rng.randrange(1, 3 * BLOCK)
                n = min(n, SIZE - off)
                if h.pread(n, off) != model[off : off + n]:
                    self.mismatches.append(f"check [{off}, +{n}) differs from what was written")
                if s.pread(n, off) != frozen[off : off + n]:
                    self.mismatches.append(f"check@c [{off}, +{n}) differs from its content")
                self.ops += 3
                stop.wait(pause)  # a steady client, not a load test: the fuzzer gets the CPU
        except nbd.Error as err:
            self.ended = str(err)
        finally:
            for handle in (h, s):
                with contextlib.suppress(nbd.Error):
                    handle.shutdown()


@dataclass
class Result:
    target: str
    returncode: int
    inputs: int
    seconds: float
    coverage: str  # libFuzzer's last "cov: .. ft: .. corp: .." figures
    crashes: list[str]  # inputs saved by libFuzzer (crash-*, timeout-*, oom-*)
    server_errors: int
    second_client: SecondClient
    final_check: str  # "" when the store reopened exact
    tail: str  # the fuzzing process's last lines of output

    @property
    def ok(self) -> bool:
        return (self.returncode == 0 and not self.crashes and not self.server_errors
                and not self.second_client.mismatches and self.second_client.ops > 0
                and not self.final_check)  # fmt: skip


def final_check(workdir: Path) -> str:
    paths = {o: workdir / f"{o}.img" for o in ("fuzz", "check")}
    try:
        with Engine.open(workdir / "store", paths, BLOCK) as eng:
            invalid = [f"{i.origin}@{i.snap}" for i in eng.snapshots() if not i.valid]
            if invalid:
                return f"snapshots invalid after the session: {invalid}"
            for origin, snap in (("fuzz", "s"), ("check", "c")):
                if eng.snapshot_device(origin, snap).pread(0, SIZE) != origin_content(origin):
                    return f"{origin}@{snap} does not read its creation content"
    except Exception as err:
        return f"reopening the store failed: {type(err).__name__}: {err}"
    return ""


def sanitizer_env() -> dict[str, str]:
    """Environment for fuzzing C code built with -fsanitize=address,undefined,
    fuzzer-no-link: atheris' ASan+libFuzzer runtime preloaded, every report fatal."""
    spec = importlib.util.find_spec("atheris")
    assert spec is not None and spec.origin is not None, "atheris is not installed"
    runtime = Path(spec.origin).parent.parent / "asan_with_fuzzer.so"  # beside the package
    return {
        "LD_PRELOAD": str(runtime),
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:allocator_may_return_null=1",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    }


def fuzz(target: str, runs: int, corpus: list[Path], workdir: Path, max_len: int = 65536,
         extra: tuple[str, ...] = (), servers: dict[str, str] | None = None,
         env: dict[str, str] | None = None) -> Result:  # fmt: skip
    """Run ``target`` for ``runs`` inputs; ``corpus[0]`` receives new inputs (libFuzzer).
    ``servers``: transmission servers to add, {name: "module:function"}; ``env``: more
    environment for the fuzzing process (e.g. :func:`sanitizer_env`)."""
    run_dir, artifacts = workdir / "fuzzer", workdir / "artifacts"
    run_dir.mkdir(parents=True)
    artifacts.mkdir()
    plug = [a for name, where in (servers or {}).items() for a in ("--server", f"{name}={where}")]
    cmd = [sys.executable, "-m", "reliability.fuzz.run", *plug, target, str(run_dir),
           f"-runs={runs}", f"-max_len={max_len}", "-timeout=10", "-rss_limit_mb=4096",
           "-print_final_stats=1", f"-artifact_prefix={artifacts}/", *extra,
           *map(str, corpus)]  # fmt: skip
    started = time.monotonic()
    log = workdir / "fuzz.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})  # fmt: skip
        client = SecondClient()
        stop = threading.Event()
        while not (run_dir / "ready").exists() and proc.poll() is None:
            time.sleep(0.05)
        host_dir = Path((run_dir / "ready").read_text()) if (run_dir / "ready").exists() else None
        thread = threading.Thread(target=client.run, args=(Path(f"{host_dir}/nbd.sock"), stop))
        if proc.poll() is None and host_dir is not None:
            thread.start()
        rc = proc.wait()
        stop.set()
        if thread.is_alive() or thread.ident is not None:
            thread.join(30)
    seconds = time.monotonic() - started
    text = log.read_text(errors="replace")
    stats_file = run_dir / "stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    covs = re.findall(r"(cov: \d+ ft: \d+ corp: \d+/\S+)", text)
    done = re.search(r"Done (\d+) runs", text)
    inputs = int(done.group(1)) if done else int(stats.get("inputs", 0))
    crashes = sorted(str(p) for p in artifacts.iterdir())
    checked = final_check(host_dir) if host_dir else "the fuzzing process never served"
    return Result(target, rc, inputs, seconds, covs[-1] if covs else "", crashes,
                  int(stats.get("server_errors", 0)), client, checked,
                  "\n".join(text.strip().splitlines()[-25:]))  # fmt: skip


def seed_corpus(source: Path, into: Path) -> Path:
    """A writable copy of a committed corpus directory."""
    shutil.copytree(source, into)
    return into
