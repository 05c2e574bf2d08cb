#!/usr/bin/env bash
# Installs everything snapimg needs on a Debian 12 machine, idempotently (run as root).
# Debian packages first (QEMU, libnbd, guest image tools, libvirt), then a virtualenv in
# .venv made from Debian's python3 with --system-site-packages, so that Debian's
# python3-libnbd imports in it, holding snapimg (editable) and its Python dependencies.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

APT_PACKAGES=(
  # QEMU 7.2 and its NBD/storage tools
  qemu-system-x86 qemu-utils qemu-block-extra
  # independent NBD clients and servers
  libnbd-bin python3-libnbd nbdkit fio
  # test certificates for NBD over TLS (tests/nbd/tlscerts.py)
  openssl
  # guest images: assembler, FAT tools, partitioning, filesystems
  nasm mtools dosfstools fdisk e2fsprogs ntfs-3g cpio
  # loop-mounted XFS with reflink: the reflink tests (mkfs.xfs, xfs_fsr) and the crash
  # recorder's clone tests (tests/crash)
  xfsprogs
  # the order of a server's last steps, with its unlink(2)s held up (tests/interop)
  strace
  # C code under the fuzz harness with ASan/UBSan and libFuzzer coverage (tests/fuzz)
  clang-14 libclang-rt-14-dev
  # Python venv and building libvirt-python from source
  python3-venv python3-dev gcc pkg-config libvirt-dev
  # libvirt daemon for the VM rig (no libvirt-daemon-system: see docs/vmtests.md)
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "install: apt-get install ${missing[*]}"
  log=$(mktemp)
  if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "install: apt-get failed (log above)" >&2
    exit 1
  fi
  rm -f "$log"
fi

venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
  echo "install: creating $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp="$venv/.snapimg-installed"
# the install (and the C extension's build) is redone when the packaging or C code changes
want=$(cat "$root/pyproject.toml" "$root/setup.py" "$root"/csrc/datapath/* | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "install: pip install -e .[dev] into $venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[dev]"
  echo "$want" >"$stamp"
fi
# The wheel holds snapimg only: the VM rig (vmtests/), tests/ and bench/ are imported from
# the checkout, which this puts on the virtualenv's path (python -m vmtests, bench/*.py).
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "$root" >"$site/snapimg-checkout.pth"
