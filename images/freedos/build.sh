#!/usr/bin/env bash
# Builds the FreeDOS guest artefacts of the VM rig into OUT_DIR:
#   boot.img      a copy of the FreeDOS boot floppy with our CONFIG.SYS, AUTOEXEC.BAT,
#                 WRITER.COM and READER.COM (the rig adds a JOB.BAT to a per-VM copy)
#   testdisk.img  the disk under test: MBR (16 heads x 63 sectors, CHS filled in) with one
#                 active FAT16 partition at LBA 63, then a raw region at the end of the disk;
#                 sector 0 holds at 0x100 "SNAPIMG-TESTDISK", raw start LBA, raw sector count
#   WRITER.COM, READER.COM
# Usage: build.sh FREEDOS_FLOPPY_IMAGE OUT_DIR
# Needs nasm, mtools, dosfstools (mkfs.fat) and sfdisk.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
floppy_in=$1
out=$2

HEADS=16
SPT=63
CYLINDERS=40               # whole cylinders: BIOS geometry stays sane (see docs/vmtests.md)
FAT_CYLINDERS=26           # partition: LBA 63 .. end of cylinder 25; raw region after it
total=$((CYLINDERS * HEADS * SPT))
part_start=$SPT
raw_start=$((FAT_CYLINDERS * HEADS * SPT))
part_size=$((raw_start - part_start))
raw_count=$((total - raw_start))

mkdir -p "$out"
tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

nasm -f bin -I "$here/" -o "$tmp/WRITER.COM" "$here/writer.asm"
nasm -f bin -I "$here/" -o "$tmp/READER.COM" "$here/reader.asm"

# The boot floppy: our CONFIG.SYS and AUTOEXEC.BAT (CR LF) replace the image's own; the
# FDCONFIG.SYS / FDAUTO.BAT of official FreeDOS releases would take precedence, so they go.
cp "$floppy_in" "$tmp/boot.img"
chmod u+w "$tmp/boot.img"
export MTOOLS_SKIP_CHECK=1 MTOOLS_NO_VFAT=1
for f in FDCONFIG.SYS FDAUTO.BAT CONFIG.SYS AUTOEXEC.BAT; do
  mdel -i "$tmp/boot.img" "::$f" 2>/dev/null || true
done
for f in CONFIG.SYS AUTOEXEC.BAT; do
  sed 's/\r*$/\r/' "$here/$f" >"$tmp/$f"
  mcopy -i "$tmp/boot.img" "$tmp/$f" "::$f"
done
mcopy -i "$tmp/boot.img" "$tmp/WRITER.COM" "$tmp/READER.COM" ::

# The test disk.
truncate -s $((total * 512)) "$tmp/testdisk.img"
printf 'label: dos\nunit: sectors\nstart=%d, size=%d, type=6, bootable\n' \
  "$part_start" "$part_size" | sfdisk -q --no-reread "$tmp/testdisk.img" >/dev/null
# sfdisk leaves CHS to its own guess: write the 16x63 CHS fields of entry 1 ourselves.
chs() {  # LBA -> 3 bytes head, sector|cyl_hi, cyl_lo
  local lba=$1 c h s
  c=$((lba / (HEADS * SPT))); h=$(((lba / SPT) % HEADS)); s=$((lba % SPT + 1))
  printf "\\x$(printf %02x "$h")\\x$(printf %02x $((s | ((c >> 2) & 0xC0))))\\x$(printf %02x $((c & 0xFF)))"
}
chs "$part_start" | dd of="$tmp/testdisk.img" bs=1 seek=$((0x1BF)) conv=notrunc status=none
chs $((raw_start - 1)) | dd of="$tmp/testdisk.img" bs=1 seek=$((0x1C3)) conv=notrunc status=none
mkfs.fat -F 16 -n SNAPTEST -g "$HEADS/$SPT" -h "$part_start" --offset "$part_start" \
  "$tmp/testdisk.img" $((part_size / 2)) >/dev/null 2>&1
le32() { printf "\\x$(printf %02x $(($1 & 255)))\\x$(printf %02x $((($1 >> 8) & 255)))\\x$(printf %02x $((($1 >> 16) & 255)))\\x$(printf %02x $((($1 >> 24) & 255)))"; }
{ printf 'SNAPIMG-TESTDISK'; le32 "$raw_start"; le32 "$raw_count"; } |
  dd of="$tmp/testdisk.img" bs=1 seek=$((0x100)) conv=notrunc status=none
mdir -i "$tmp/testdisk.img@@$((part_start * 512))" :: >/dev/null

mv "$tmp/WRITER.COM" "$tmp/READER.COM" "$tmp/boot.img" "$tmp/testdisk.img" "$out/"
echo "built $out: testdisk $total sectors, FAT16 at $part_start+$part_size, raw at $raw_start+$raw_count"
