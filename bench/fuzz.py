#!/usr/bin/env python3
"""Coverage-guided fuzzing of the NBD server's parsers (docs/fuzzing.md).

For each target (handshake, transmission-python): atheris runs --runs inputs starting
from the committed corpus (tests/fuzz/corpus/) and the seeds, while a second client
writes and verifies data through the same server; afterwards the store is reopened and
checked.  An input that fails is copied into tests/fuzz/corpus/ (a regression test from
then on).  --save-corpus merges the new interesting inputs into the committed corpus.

Prints with --json: {"targets": {NAME: {"inputs", "seconds", "exec_per_s", "coverage",
"crashes", "server_errors", "second_client_ops", "second_client_mismatches",
"final_check", "ok"}}, "ok": true|false}.
Usage: bench/fuzz.py [--json] [--runs 1000000] [--targets handshake,transmission-python]
       [--save-corpus] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from reliability.fuzz import seeds, session
from reliability.fuzz.targets import TRANSMISSION_SERVERS

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
TARGETS = ["handshake", *(f"transmission-{s}" for s in TRANSMISSION_SERVERS)]


def corpus_kind(target: str) -> str:
    return "handshake" if target == "handshake" else "transmission"


def work_corpus(target: str, into: Path) -> Path:
    """The committed corpus of the target's kind plus the seeds, in a scratch directory."""
    kind = corpus_kind(target)
    into.mkdir(parents=True)
    if (CORPUS / kind).is_dir():
        for f in (CORPUS / kind).iterdir():
            shutil.copy(f, into / f.name)
    for name, data in (seeds.handshake() if kind == "handshake" else seeds.transmission()).items():
        (into / f"seed-{name}").write_bytes(data)
    return into


def merge(target: str, grown: Path, base: Path) -> None:
    """libFuzzer's -merge=1: keep the inputs of ``grown`` that add coverage to the committed
    corpus."""
    committed = CORPUS / corpus_kind(target)
    committed.mkdir(parents=True, exist_ok=True)
    host = base / "merge-host"
    host.mkdir()
    cmd = [sys.executable, "-m", "reliability.fuzz.run", target, str(host), "-merge=1",
           "-max_len=65536", f"-artifact_prefix={host}/", str(committed), str(grown)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=host)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--save-corpus", action="store_true",
                    help="merge new inputs into tests/fuzz/corpus")  # fmt: skip
    ap.add_argument("--workdir", help="scratch space (default: /dev/shm)")
    args = ap.parse_args()
    parent = args.workdir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    base = Path(tempfile.mkdtemp(prefix="snapimg-fuzz-", dir=parent))
    out: dict[str, dict[str, object]] = {}
    try:
        for target in args.targets.split(","):
            if target not in TARGETS:
                raise SystemExit(f"fuzz: unknown target {target!r}: expected one of {TARGETS}")
            corpus = work_corpus(target, base / f"{target}-corpus")
            r = session.fuzz(target, args.runs, [corpus], base / target)
            for crash in r.crashes:  # keep it as a regression input
                dest = CORPUS / corpus_kind(target)
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy(crash, dest / Path(crash).name)
            if args.save_corpus:
                merge(target, corpus, base / target)
            out[target] = {
                "inputs": r.inputs, "seconds": round(r.seconds, 1),
                "exec_per_s": round(r.inputs / r.seconds) if r.seconds else 0,
                "coverage": r.coverage, "crashes": r.crashes, "server_errors": r.server_errors,
                "second_client_ops": r.second_client.ops,
                "second_client_mismatches": len(r.second_client.mismatches),
                "final_check": r.final_check or "ok", "ok": r.ok,
            }  # fmt: skip
            print(f"{target}: {json.dumps(out[target])}", file=sys.stderr, flush=True)
            if not r.ok:
                print(r.tail, file=sys.stderr)
                for m in r.second_client.mismatches[:5]:
                    print(f"second client: {m}", file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result = {"targets": out, "ok": all(t["ok"] for t in out.values())}
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
