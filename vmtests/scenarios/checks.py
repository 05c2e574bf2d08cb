"""Host-side checks of what the DOS writer left on an image (an origin or a snapshot copy).

Each check returns a list of problems (empty: the image passed).
"""

from __future__ import annotations

from pathlib import Path

from vmtests.errors import VmError
from vmtests.guests import freedos

CHUNK_SECTORS = 64  # the writer's sectors per INT 13h call (images/freedos/writer.asm)


def all_writes_present(
    image: Path, last_gen: int, raw_sectors: int, file_kib: int, first_gen: int = 1
) -> list[str]:
    """After WRITER first..last finished: every stamp and every file of its last writes."""
    problems: list[str] = []
    start, _ = freedos.read_marker(image)
    try:
        gens = freedos.stamp_generations(image, start, raw_sectors)
    except freedos.TornSector as err:
        return [f"origin raw region: {err}"]
    stale = [start + i for i, g in enumerate(gens) if g != last_gen]
    if stale:
        problems.append(
            f"origin raw region: {len(stale)} sectors lack generation {last_gen} "
            f"(first LBA {stale[0]}: generation {gens[stale[0] - start]})"
        )
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


def snapshot_state(
    image: Path, gen_lo: int, gen_hi: int, raw_sectors: int, file_kib: int, first_gen: int = 1
) -> list[str]:
    """A snapshot taken while the writer was in generation gen_lo..gen_hi must show a state the
    disk passed through: whole stamps only, generations G then G-1 along the region (the
    writer goes in LBA order; only the chunk in flight may mix), gen_lo-1 <= G-1, G <= gen_hi;
    and files as :func:`snapshot_files` says."""
    problems: list[str] = []
    start, _ = freedos.read_marker(image)
    try:
        gens = freedos.stamp_generations(image, start, raw_sectors)
    except freedos.TornSector as err:
        return [f"snapshot raw region: {err}"]
    newest, oldest = max(gens), min(gens)
    if newest > gen_hi:
        problems.append(
            f"snapshot raw region: generation {newest} is newer than the "
            f"generation in flight ({gen_hi})"
        )
    if oldest < gen_lo - 1:
        problems.append(
            f"snapshot raw region: generation {oldest} predates generation "
            f"{gen_lo - 1}, which was complete before the snapshot"
        )
    if newest - oldest > 1:
        problems.append(f"snapshot raw region: generations {oldest}..{newest} at once")
    else:
        first_old = next((i for i, g in enumerate(gens) if g == oldest), len(gens))
        last_new = max((i for i, g in enumerate(gens) if g == newest), default=-1)
        if newest != oldest and last_new // CHUNK_SECTORS > first_old // CHUNK_SECTORS:
            problems.append(
                f"snapshot raw region: generation {newest} at LBA "
                f"{start + last_new} after generation {oldest} at LBA "
                f"{start + first_old} (not a state the disk passed through)"
            )
    # Where the writer was, from the stamps: inside generation G's raw writes (G and G-1
    # mixed: every file before G finished), or past them (all G: G's file may be in flight
    # if G had begun when the snapshot was taken; G < gen_lo: it had finished).
    if newest != oldest or newest < gen_lo:
        done_through, in_flight = newest - (newest != oldest), None
    else:
        done_through, in_flight = newest - 1, newest
    return problems + snapshot_files(image, done_through, in_flight, file_kib, first_gen)


def snapshot_files(
    image: Path, done_through: int, in_flight: int | None, file_kib: int, first_gen: int = 1
) -> list[str]:
    """The FAT of a snapshot taken when the writer had finished generations up to
    ``done_through`` (DOS reported their files closed and flushed) and possibly was writing
    generation ``in_flight``'s file.

    The root directory must be readable.  Every other file must hold exactly what the last
    generation up to ``done_through`` wrote into it, or not exist when none did.  The file in
    flight may be in any state DOS passes through while writing and closing it, including
    its directory entry written before its FAT chain (mtools then cannot follow the chain):
    crash-consistent, not corrupt, so it is not checked."""
    skip = freedos.file_name(freedos.file_slot(in_flight)) if in_flight is not None else None
    where = f"generations {first_gen}..{done_through} finished" + (
        f", {in_flight}'s file in flight" if in_flight is not None else ""
    )
    try:
        names = freedos.fat_list(image)
    except VmError as err:
        return [f"snapshot FAT not readable ({where}): {err}"]
    problems: list[str] = []
    for slot in range(freedos.FILE_SLOTS):
        name = freedos.file_name(slot)
        if name == skip:
            continue
        done = [g for g in range(first_gen, done_through + 1) if freedos.file_slot(g) == slot]
        if not done:
            if name in names:
                problems.append(
                    f"snapshot FAT: {name} exists, but no generation wrote it ({where})"
                )
            continue
        if name not in names:
            problems.append(f"snapshot FAT: {name} missing ({where}; files: {names})")
            continue
        try:
            data = freedos.fat_read(image, name)
        except VmError as err:
            problems.append(f"snapshot FAT: {name} not readable ({where}): {err}")
            continue
        if data != freedos.expected_file(done[-1], file_kib):
            problems.append(
                f"snapshot FAT: {name} is not generation {done[-1]}'s content ({where})"
            )
    return problems
