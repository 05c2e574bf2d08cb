#!/usr/bin/env python3
"""Build the snapimg Linux test guest (kernel + initramfs) from Debian packages.

    python images/linux/build.py [--cache DIR] [--force] [--json]

The packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a
staging folder: nothing is installed on the host.  The result lives in
``CACHE/build-KEY/`` where KEY hashes this recipe's files and the exact package versions, so a
build is reused until either changes.  The initramfs is deterministic (same inputs, same bytes).

What goes in: Debian's kernel (as an uncompressed ``vmlinux`` with its PVH note, which QEMU
boots directly and faster than the bzImage under TCG), busybox, dropbear, e2fsprogs, dosfstools,
qemu-guest-agent, the shared libraries they link, and the kernel modules for the storage
controllers, virtio/e1000 networking, virtio-serial (the agent's port), ext4 and vfat, in
dependency order.  Per-run secrets (SSH keys) are NOT in it: the rig
appends them as a second cpio archive (see vmtests/guests/linux.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = Path(__file__).resolve().parent
REPO = RECIPE.parents[1]
sys.path.insert(0, str(REPO))  # for vmtests.cpio, shared with the rig's per-run overlay
sys.path.insert(0, str(RECIPE))

from elfinfo import is_elf, needed_libraries  # noqa: E402
from modules import ModuleTree  # noqa: E402

from vmtests import cpio  # noqa: E402

DEFAULT_CACHE = REPO / "images" / "cache" / "linux"
KERNEL_META = "linux-image-amd64"
PACKAGES = [
    "busybox-static", "dropbear-bin", "e2fsprogs", "dosfstools", "qemu-guest-agent",
    # shared libraries of the programs above (checked against their DT_NEEDED at build time)
    "libc6", "libcrypt1", "libtomcrypt1", "libtommath1", "libgmp10", "zlib1g",
    "libext2fs2", "libcom-err2", "libblkid1", "libuuid1",
    "libglib2.0-0", "libpcre2-8-0", "libnuma1", "libudev1", "liburing2",
]
PROGRAMS = [
    "usr/sbin/dropbear", "usr/bin/dropbearkey",
    "sbin/e2fsck", "sbin/mke2fs", "sbin/dumpe2fs", "sbin/fsck.fat", "sbin/mkfs.fat",
    "usr/sbin/qemu-ga",
]
LIB_DIRS = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"]
LOADER = "lib64/ld-linux-x86-64.so.2"
# Module groups with parameters; dependencies are added from .modinfo.  /init always loads
# "net" first (SSH answers sooner), then the groups named by snapimg.load=G1,G2 on the kernel
# command line, or every group.  Storage group names are the rig's controller names.
MODULES = {
    "net": ["virtio_pci", "virtio_net", "e1000", "virtio_rng"],
    # the guest agent's virtio-serial port (/init starts qemu-ga when the port exists)
    "agent": ["virtio_console"],
    # sd_mod before the controller keeps sdX names stable between boots
    "ide": ["sd_mod", "ata_piix", "ata_generic"],
    "ahci": ["sd_mod", "ahci"],
    "lsi": ["sd_mod", "sym53c8xx settle=0"],
    "megasas": ["sd_mod", "megaraid_sas"],
    "virtio-scsi": ["sd_mod", "virtio_scsi"],
    "virtio-blk": ["virtio_blk"],
    "ext4": ["ext4"],
    "vfat": ["vfat", "nls_cp437", "nls_ascii", "nls_utf8", "nls_iso8859_1"],
}
CMDLINE = "console=ttyS0 panic=-1 loglevel=4"
ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    # dropbear refuses key logins to an account with an empty password: lock it instead
    "etc/shadow": "root:*:19000:0:99999:7:::\n",
    "etc/group": "root:x:0:\n",
    "etc/shells": "/bin/sh\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\n",
    "etc/hosts": "127.0.0.1 localhost snapimg-guest\n",
}


class BuildError(RuntimeError):
    """The guest cannot be built (apt, a missing library or module, a bad kernel)."""


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd[:3])}... failed: {proc.stderr.strip()[-500:]}")
    return str(proc.stdout)


def kernel_package() -> str:
    out = _run(["apt-cache", "depends", KERNEL_META])
    found = re.findall(r"Depends: (linux-image-\d[\w.+-]*-amd64)\b", out)
    if not found:
        raise BuildError(f"apt-cache depends {KERNEL_META} names no kernel (run apt-get update)")
    return str(found[0])


def resolve_debs(packages: list[str]) -> list[tuple[str, str, str]]:
    """(url, file name, sha256) of the exact .deb each package name resolves to now."""
    out = _run(["apt-get", "download", "--print-uris", *packages])
    debs = []
    for line in out.splitlines():
        match = re.match(r"'(\S+)' (\S+) \d+ SHA256:([0-9a-f]{64})", line)
        if match:
            debs.append((match[1], match[2], match[3]))
    if len(debs) != len(packages):
        raise BuildError(f"apt resolved {len(debs)} of {len(packages)} packages")
    return sorted(debs, key=lambda deb: deb[1])


def recipe_digest(debs: list[tuple[str, str, str]]) -> str:
    digest = hashlib.sha256()
    sources = sorted(RECIPE.glob("*.py")) + [RECIPE / "init", REPO / "vmtests" / "cpio.py"]
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for _url, name, sha in debs:
        digest.update(f"{name} {sha}\n".encode())
    return digest.hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(debs: list[tuple[str, str, str]], into: Path) -> list[Path]:
    """The .deb files in ``into``, fetched with apt-get download when missing, sha256-checked."""
    into.mkdir(parents=True, exist_ok=True)
    missing = [name.split("_")[0] for _url, name, sha in debs
               if not (into / name).exists() or _sha256(into / name) != sha]
    if missing:
        _run(["apt-get", "download", *missing], cwd=into)
    for _url, name, sha in debs:
        if _sha256(into / name) != sha:
            raise BuildError(f"{name}: sha256 does not match the archive's")
    return [into / name for _url, name, _sha in debs]


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is XZ-compressed (Debian's is)."""
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise BuildError("no XZ payload in the kernel image")
    vmlinux = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    if not is_elf(vmlinux) or b"Xen" not in vmlinux:
        raise BuildError("the kernel payload is not an ELF with a PVH (Xen) note")
    return vmlinux


def _library(staging: Path, soname: str) -> Path:
    for folder in LIB_DIRS:
        if (staging / folder / soname).exists():
            return staging / folder / soname
    raise BuildError(f"library {soname} is in no unpacked package: add its package to PACKAGES")


def program_entries(staging: Path) -> list[cpio.Entry]:
    """Busybox, the programs, their shared libraries (closure of DT_NEEDED) and the loader."""
    entries = [cpio.regular("bin/busybox", (staging / "bin/busybox").read_bytes(), 0o755),
               cpio.symlink("bin/sh", "busybox")]
    libraries: dict[str, bytes] = {}
    todo = [(staging / program).read_bytes() for program in PROGRAMS]
    for program, data in zip(PROGRAMS, todo, strict=False):
        entries.append(cpio.regular(program, data, 0o755))
    while todo:
        for soname in needed_libraries(todo.pop()):
            if soname not in libraries:
                libraries[soname] = _library(staging, soname).read_bytes()
                todo.append(libraries[soname])
    for soname in sorted(libraries):
        entries.append(cpio.regular(f"lib/x86_64-linux-gnu/{soname}", libraries[soname], 0o755))
    entries.append(cpio.regular(LOADER, (staging / LOADER).resolve().read_bytes(), 0o755))
    return entries


def module_entries(staging: Path) -> tuple[list[cpio.Entry], dict[str, list[str]]]:
    """Each group's load order (dependencies first) in etc/modules/GROUP, and the modules."""
    versions = sorted((staging / "lib/modules").iterdir())
    tree = ModuleTree(versions[-1])
    params = {line.split()[0]: line for roots in MODULES.values() for line in roots}
    entries = [cpio.directory("etc/modules")]
    lists, wanted = {}, set()
    for group, roots in MODULES.items():
        order = tree.load_order([line.split()[0] for line in roots])
        lists[group] = order
        wanted.update(order)
        text = "".join(params.get(name, name) + "\n" for name in order)
        entries.append(cpio.regular(f"etc/modules/{group}", text.encode()))
    groups = " ".join(group for group in MODULES if group not in ("net", "agent"))
    entries.append(cpio.regular("etc/modules/groups", f"{groups}\n".encode()))
    for name in sorted(wanted):
        entries.append(cpio.regular(f"lib/modules/{name}.ko", tree.paths[name].read_bytes()))
    return entries, lists


def initramfs_entries(staging: Path) -> tuple[list[cpio.Entry], dict[str, list[str]]]:
    folders = ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "etc/dropbear", "lib",
               "lib/x86_64-linux-gnu", "lib/modules", "lib64", "dev", "proc", "sys", "run",
               "mnt", "var"]
    entries = [cpio.directory(folder) for folder in folders]
    entries += [cpio.directory("root", 0o700), cpio.directory("root/.ssh", 0o700),
                cpio.directory("tmp", 0o1777), cpio.symlink("var/run", "../run")]
    entries += [cpio.regular(path, text.encode(), 0o600 if "shadow" in path else 0o644)
                for path, text in ETC.items()]
    entries.append(cpio.regular("init", (RECIPE / "init").read_bytes(), 0o755))
    entries += program_entries(staging)
    modules, lists = module_entries(staging)
    return entries + modules, lists


def fetch(cache: Path) -> tuple[list[tuple[str, str, str]], list[Path] | None]:
    """Resolve the packages, and download them unless this exact build is cached."""
    debs = resolve_debs(sorted([kernel_package(), *PACKAGES]))
    if (cache / f"build-{recipe_digest(debs)}" / "manifest.json").exists():
        return debs, None
    return debs, download(debs, cache / "debs")


def build(cache: Path, force: bool = False) -> dict[str, object]:
    try:
        debs, deb_files = fetch(cache)
    except BuildError:
        # stale package lists (a kernel update removed the old .deb from the mirror): refresh once
        _run(["apt-get", "update", "-q"])
        debs, deb_files = fetch(cache)
    out = cache / f"build-{recipe_digest(debs)}"
    manifest = out / "manifest.json"
    if manifest.exists() and not force:
        result: dict[str, object] = json.loads(manifest.read_text())
        return result
    if deb_files is None:
        deb_files = download(debs, cache / "debs")
    with tempfile.TemporaryDirectory(dir=cache, prefix="staging-") as tmp:
        staging = Path(tmp) / "root"
        for deb in deb_files:
            _run(["dpkg-deb", "-x", str(deb), str(staging)])
        bzimages = sorted((staging / "boot").glob("vmlinuz-*"))
        version = bzimages[-1].name.removeprefix("vmlinuz-")
        entries, lists = initramfs_entries(staging)
        work = Path(tmp) / "out"
        work.mkdir()
        (work / "vmlinux").write_bytes(extract_vmlinux(bzimages[-1].read_bytes()))
        shutil.copyfile(bzimages[-1], work / "vmlinuz")
        (work / "initramfs.cpio.gz").write_bytes(cpio.gzipped(entries))
        result = {
            "kernel": str(out / "vmlinux"),
            "bzimage": str(out / "vmlinuz"),
            "initrd": str(out / "initramfs.cpio.gz"),
            "initrd_sha256": _sha256(work / "initramfs.cpio.gz"),
            "kernel_version": version,
            "cmdline": CMDLINE,
            "packages": [name for _url, name, _sha in debs],
            "modules": lists,
        }
        (work / "manifest.json").write_text(json.dumps(result, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    for old in cache.glob("build-*"):  # builds of older recipes or package versions
        if old != out:
            shutil.rmtree(old, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="cache folder (default: images/cache/linux, git-ignored)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--json", action="store_true", help="print the build manifest as JSON")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    try:
        result = build(args.cache.resolve(), args.force)
    except BuildError as err:
        print(f"images/linux/build.py: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(f"kernel {result['kernel']}\ninitrd {result['initrd']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
