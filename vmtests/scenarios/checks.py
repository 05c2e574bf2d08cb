"""Host-side checks of what the DOS writer left on an image (an origin or a snapshot copy).

Each check returns a list of problems (empty: the image passed).
"""

from __future__ import annotations

from pathlib import Path

from vmtests.errors import VmError
from vmtests.guests import freedos

CHUNK_SECTORS = 64   # the writer's sectors per INT 13h call (images/freedos/writer.asm)


def all_writes_present(image: Path, last_gen: int, raw_sectors: int, file_kib: int,
                       first_gen: int = 1) -> list[str]:
    """After WRITER first..last finished: every stamp and every file of its last writes."""
    problems: list[str] = []
    start, _ = freedos.read_marker(image)
    try:
        gens = freedos.stamp_generations(image, start, raw_sectors)
    except freedos.TornSector as err:
        return [f"origin raw region: {err}"]
    stale = [start + i for i, g in enumerate(gens) if g != last_gen]
    if stale:
        problems.append(f"origin raw region: {len(stale)} sectors lack generation {last_gen} "
                        f"(first LBA {stale[0]}: generation {gens[stale[0] - start]})")
    try:
        names = freedos.fat_list(image)
    except VmError as err:
        return [*problems, f"origin FAT: {err}"]
    for slot in range(freedos.FILE_SLOTS):
        written = [g for g in range(first_gen, last_gen + 1) if freedos.file_slot(g) == slot]
        if not written:
            continue
        name = freedos.file_name(slot)
        if name not in names:
            problems.append(f"origin FAT: {name} missing (files: {names})")
            continue
        data = freedos.fat_read(image, name)
        if data != freedos.expected_file(written[-1], file_kib):
            problems.append(f"origin FAT: {name} is not generation {written[-1]}'s content")
    return problems


def snapshot_state(image: Path, gen_lo: int, gen_hi: int, raw_sectors: int) -> list[str]:
    """A snapshot taken while the writer was in generation gen_lo..gen_hi must show a state the
    disk passed through: whole stamps only, generations G then G-1 along the region (the
    writer goes in LBA order; only the chunk in flight may mix), gen_lo-1 <= G-1, G <= gen_hi,
    and a FAT that mtools reads."""
    problems: list[str] = []
    start, _ = freedos.read_marker(image)
    try:
        gens = freedos.stamp_generations(image, start, raw_sectors)
    except freedos.TornSector as err:
        return [f"snapshot raw region: {err}"]
    newest, oldest = max(gens), min(gens)
    if newest > gen_hi:
        problems.append(f"snapshot raw region: generation {newest} is newer than the "
                        f"generation in flight ({gen_hi})")
    if oldest < gen_lo - 1:
        problems.append(f"snapshot raw region: generation {oldest} predates generation "
                        f"{gen_lo - 1}, which was complete before the snapshot")
    if newest - oldest > 1:
        problems.append(f"snapshot raw region: generations {oldest}..{newest} at once")
    else:
        first_old = next((i for i, g in enumerate(gens) if g == oldest), len(gens))
        last_new = max((i for i, g in enumerate(gens) if g == newest), default=-1)
        if newest != oldest and last_new // CHUNK_SECTORS > first_old // CHUNK_SECTORS:
            problems.append(f"snapshot raw region: generation {newest} at LBA "
                            f"{start + last_new} after generation {oldest} at LBA "
                            f"{start + first_old} (not a state the disk passed through)")
    try:
        for name in freedos.fat_list(image):
            freedos.fat_read(image, name)
    except VmError as err:
        problems.append(f"snapshot FAT not readable: {err}")
    return problems
