"""Filesystem work inside the Linux guest: a writer with a manifest, and its verification.

The writer (run in the writer VM on the origin's ext4) loops over operations; operation *i*
writes fresh random data to ``data/.tmp`` and fsyncs it, appends ``pending NAME SHA256`` to
``manifest`` and fsyncs that, renames the file over ``data/fNN`` and fsyncs the directory, then
appends ``done NAME SHA256`` and fsyncs again.  The first ``FILES`` operations create files,
later ones rewrite them.  ``/tmp/progress`` holds the number of completed operations (and
``stopped`` once ``/tmp/stop`` made the writer finish and unmount).

Crash-consistency argument (what a point-in-time snapshot must satisfy after journal replay):
a ``done`` line can only be on disk after its file's rename was durable, and the rename is
only issued after its ``pending`` line was durable.  So every file must hash to the hash of its
last ``done`` line, or to the hash of a ``pending`` line written after that (the one operation
in flight); a file with no line at all must not exist.  And every operation completed before
the snapshot was created must be in it, none started after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MOUNT = "/mnt"

# The one disk of the VM (sdX on IDE/SCSI, vdX on virtio-blk), waited for while drivers probe.
FIND_DISK = """
find_disk() {
    for _ in $(seq 100); do
        for dev in /sys/block/sd* /sys/block/vd*; do
            [ -e "$dev" ] && { echo "/dev/${dev##*/}"; return 0; }
        done
        sleep 0.1
    done
    echo "no disk appeared" >&2; return 1
}
"""


def writer_script(files: int) -> str:
    return (
        FIND_DISK
        + f"""
set -e
# replaced, never rewritten in place: a reader must not see it empty
report() {{ echo "$1" >/tmp/progress.new; mv /tmp/progress.new /tmp/progress; }}
trap 'report "failed (exit $?)"' EXIT
dev=$(find_disk)
mount -t ext4 "$dev" {MOUNT}
cd {MOUNT}
mkdir -p data
sync . data
i=0
report 0
while [ ! -e /tmp/stop ]; do
    i=$((i + 1))
    name=data/f$((i % {files}))
    dd if=/dev/urandom of=data/.tmp bs=4096 count=$((i * 7 % 48 + 1)) conv=fsync 2>/dev/null
    sum=$(sha256sum data/.tmp | cut -d' ' -f1)
    echo "pending $name $sum" >>manifest
    sync manifest
    mv data/.tmp "$name"
    sync data
    echo "done $name $sum" >>manifest
    sync manifest
    report $i
done
cd /
umount {MOUNT}
trap - EXIT
report stopped
"""
    )


# Run in the backup VM on the snapshot: device hash first (before anything writes), then fsck.
HASH_DEVICE = FIND_DISK + 'dev=$(find_disk); sha256sum "$dev" | cut -d" " -f1'
FSCK = FIND_DISK + 'dev=$(find_disk); e2fsck -fy "$dev"'
MOUNT_AND_LIST = (
    FIND_DISK
    + f"""
set -e
dev=$(find_disk)
mount -t ext4 "$dev" {MOUNT}
cd {MOUNT}
echo "== manifest"
cat manifest
echo "== files"
for f in data/*; do [ -e "$f" ] && sha256sum "$f"; done
"""
)

# A quiesced snapshot in the backup VM: the device is made read-only in the kernel first, so
# neither e2fsck -n nor the ro mount can replay a journal (ext4 refuses to mount a filesystem
# that needs recovery from a read-only device); the listing is MOUNT_AND_LIST's.
READ_ONLY_FSCK = (
    FIND_DISK
    + """
dev=$(find_disk)
blockdev --setro "$dev"
[ "$(blockdev --getro "$dev")" = 1 ] || { echo "cannot make $dev read-only" >&2; exit 99; }
e2fsck -fn "$dev"
"""
)
READ_ONLY_MOUNT_AND_LIST = MOUNT_AND_LIST.replace(
    'mount -t ext4 "$dev"',
    '[ "$(blockdev --getro "$dev")" = 1 ] || exit 99\nmount -t ext4 -o ro "$dev"',
)

E2FSCK_UNCORRECTED = 4  # exit status bit: errors left uncorrected (8 and up: fsck failed)


@dataclass
class Verdict:
    done_ops: int = 0
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)


def parse_listing(text: str) -> tuple[list[str], dict[str, str]]:
    """(manifest lines, {file: sha256}) from MOUNT_AND_LIST's output."""
    manifest_part, _, files_part = text.partition("== files\n")
    manifest = manifest_part.split("== manifest\n", 1)[-1]
    # a torn last line (no newline) is an append that did not complete: not a claim
    lines = manifest.split("\n")[:-1]
    files = {}
    for line in files_part.splitlines():
        digest, _, path = line.partition("  ")
        files[path] = digest
    return lines, files


def verify(manifest: list[str], files: dict[str, str]) -> Verdict:
    """Check the files against the manifest as the module docstring explains."""
    verdict = Verdict()
    last_done: dict[str, str] = {}
    in_flight: dict[str, str] = {}
    for number, line in enumerate(manifest, 1):
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("pending", "done") or len(parts[2]) != 64:
            verdict.problems.append(f"manifest line {number} is malformed: {line!r}")
            continue
        kind, name, digest = parts
        if kind == "pending":
            in_flight[name] = digest
        else:
            verdict.done_ops += 1
            last_done[name] = digest
            in_flight.pop(name, None)
    for name in sorted(set(last_done) | set(in_flight) | set(files)):
        allowed = {d for d in (last_done.get(name), in_flight.get(name)) if d}
        actual = files.get(name)
        if actual is None:
            if name in last_done:
                verdict.problems.append(f"{name}: listed as done but missing")
            continue
        verdict.files_checked += 1
        if not allowed:
            verdict.problems.append(f"{name}: exists but the manifest never lists it")
        elif actual not in allowed:
            verdict.problems.append(
                f"{name}: sha256 {actual[:12]} matches neither "
                f"the last done nor the in-flight content"
            )
    return verdict
