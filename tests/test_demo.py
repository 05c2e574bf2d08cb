"""The README's main job runs end to end (real snapimg serve, qemu-io and qemu-img)."""

import subprocess
import sys
from pathlib import Path


def test_demo_backup_matches_snapshot_time(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "snapimg.cli.main", "demo", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RESULT: the snapshot copy is the image exactly as it was" in proc.stdout
    assert "holds every write" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # the demo cleans up after itself
