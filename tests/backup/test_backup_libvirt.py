"""``snapimg backup --libvirt DOMAIN --disk TARGET``: libvirt's pull-mode backup of a disk of a
transient, paused domain (no guest OS; writes by HMP qemu-io); ``--since`` falls back to full."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from tests.backup.helpers import SNAPIMG, qemu_io
from vmtests.libvirt_driver import Libvirtd

MiB = 1 << 20


@pytest.fixture
def domain() -> Iterator[tuple[Any, Path]]:
    tmp = Path(tempfile.mkdtemp(prefix="sibl-", dir="/tmp"))
    disks = []
    for name, pattern in (("a", "0x5a"), ("b", "0x33")):
        disk = tmp / f"{name}.img"
        with disk.open("wb") as f:
            f.truncate(16 * MiB)
        qemu_io(str(disk), f"write -P {pattern} 0 3M", "write -P 0xc3 8M 1M")
        disks.append(disk)
    name = f"snapimg-backup-test-{uuid.uuid4().hex[:8]}"
    xml = f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
      <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
      <emulator>/usr/bin/qemu-system-x86_64</emulator>
      <disk type='file' device='disk'><driver name='qemu' type='raw'/>
        <source file='{disks[0]}'/><target dev='vda' bus='virtio'/></disk>
      <disk type='file' device='disk'><driver name='qemu' type='raw'/>
        <source file='{disks[1]}'/><target dev='vdb' bus='virtio'/></disk>
      </devices></domain>"""
    daemon = Libvirtd.ensure()
    dom = daemon.conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
    try:
        yield dom, disks[0]
    finally:
        try:
            dom.destroy()
        finally:
            daemon.stop()
            shutil.rmtree(tmp, ignore_errors=True)


def hmp(dom: Any, line: str) -> str:
    return str(libvirt_qemu.qemuMonitorCommand(dom, line, 1))  # 1: HMP


def backup(*args: str) -> tuple[dict[str, Any], str]:
    proc = subprocess.run(
        [*SNAPIMG, "backup", *args, "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_libvirt_pull_backup_full_and_since_falls_back(
    domain: tuple[Any, Path], tmp_path: Path
) -> None:
    dom, disk = domain
    bk = tmp_path / "bk"
    ref1 = tmp_path / "ref1.img"
    shutil.copyfile(disk, ref1)
    first, _ = backup("--libvirt", dom.name(), "--disk", "vda", "disk", "--to", str(bk))
    assert first["kind"] == "full" and first["bytes_read"] >= 4 * MiB
    assert dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE  # the pull backup was ended

    blocks = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-block"}', 0))
    qdev = next(
        b["qdev"] for b in blocks["return"] if b.get("inserted", {}).get("file") == str(disk)
    )
    for cmd in ("write -P 0x77 1M 64k", "write -z 8M 512k"):
        out = hmp(dom, f'qemu-io -d {qdev} "{cmd}"')
        assert "error" not in out.lower(), out
    ref2 = tmp_path / "ref2.img"
    shutil.copyfile(disk, ref2)
    assert ref2.read_bytes() != ref1.read_bytes()
    second, stderr = backup(
        "--libvirt", dom.name(), "--disk", "vda", "disk", "--to", str(bk), "--since", "whatever"
    )
    assert second["kind"] == "full" and "notice: this source cannot list" in stderr

    for rec_id, ref in (("b0001", ref1), ("b0002", ref2)):
        out_img = tmp_path / f"{rec_id}.img"
        proc = subprocess.run(
            [*SNAPIMG, "restore", str(bk), "--backup", rec_id, "--to", str(out_img)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert out_img.read_bytes() == ref.read_bytes()

    proc = subprocess.run(
        [*SNAPIMG, "backup", "--libvirt", dom.name(), "--disk", "vdz", "disk", "--to", str(bk)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "has no disk 'vdz' (it has: vda, vdb)" in proc.stderr
