"""Disk controllers a guest's hard disks can sit on: the QEMU arguments for each.

Every disk gets a ``bootindex`` (the floppy, if any, gets bootindex 0 through
``-global isa-fdc.bootindexA=0``), so the firmware's disk order is explicit: SeaBIOS then
numbers hard disks in bootindex order (80h = bootindex 1) on every controller here.  Without
bootindex, megasas numbers them in reverse (scsi-id 1 becomes 80h), so guest programs that
write raw sectors still find their disk by a marker, never by number.  IDE and AHCI disks
cannot be read-only in QEMU: the machine puts a throw-away qcow2 overlay over a read-only
disk on them (see machine.py).
"""

from __future__ import annotations

from dataclasses import dataclass

HBA_ID = "hba0"


@dataclass(frozen=True)
class Controller:
    name: str
    machine_type: str  # QEMU machine: "pc" (i440fx + PIIX IDE) or "q35" (ICH9 AHCI)
    hba_device: str | None  # the -device of the host adapter, None if built into the machine
    kind: str  # "ide", "ahci" or "scsi"
    supports_read_only: bool
    reverses_disk_order: bool = False  # BIOS order reversed when no bootindex is given
    max_disks: int = 4

    def machine_args(self) -> list[str]:
        return ["-device", self.hba_device] if self.hba_device else []

    def disk_device(self, index: int, drive: str, bootindex: int) -> str:
        """The -device value attaching block node ``drive`` as disk number ``index``; the
        device's id is :func:`device_id` of ``drive`` (what ``snapimg attach --device`` takes)."""
        if not 0 <= index < self.max_disks:
            raise ValueError(f"{self.name}: disk index {index} out of range")
        ident = f"id={device_id(drive)},bootindex={bootindex}"
        if self.kind == "ide":
            where = f"bus=ide.{index // 2},unit={index % 2}"
            return f"ide-hd,drive={drive},{where},{ident}"
        if self.kind == "ahci":
            return f"ide-hd,drive={drive},bus=ide.{index},{ident}"
        channel = ",channel=0,lun=0" if self.name == "virtio-scsi" else ""
        return f"scsi-hd,drive={drive},bus={HBA_ID}.0,scsi-id={index}{channel},{ident}"


def device_id(drive: str) -> str:
    """The qdev id of the disk device on block node ``drive``."""
    return f"dev-{drive}"


CONTROLLERS: dict[str, Controller] = {
    c.name: c
    for c in (
        Controller("ide", "pc", None, "ide", supports_read_only=False),
        Controller("ahci", "q35", None, "ahci", supports_read_only=False),
        Controller("lsi", "pc", f"lsi53c895a,id={HBA_ID}", "scsi", supports_read_only=True),
        Controller(
            "megasas",
            "pc",
            f"megasas,id={HBA_ID}",
            "scsi",
            supports_read_only=True,
            reverses_disk_order=True,
        ),
        Controller(
            "virtio-scsi", "pc", f"virtio-scsi-pci,id={HBA_ID}", "scsi", supports_read_only=True
        ),
    )
}


def get(name: str) -> Controller:
    try:
        return CONTROLLERS[name]
    except KeyError:
        from snapimg.errors import UsageError

        raise UsageError(f"unknown controller {name!r} (known: {', '.join(CONTROLLERS)})") from None
