#!/usr/bin/env bash
# Prepares what test/helpers/guest.ts boots: QEMU, a static busybox, kmod (modprobe resolves
# the guest's module dependencies) and a Debian kernel, extracted with `dpkg -x` into a cache
# directory instead of installed (installing linux-image-* runs update-initramfs for minutes
# and changes the host's /boot). Safe to re-run: a kernel already in the cache is kept.
#
#   $DISKSNAP_GUEST_CACHE (default /var/tmp/disksnap-guest)/
#     kernel.version            the version guest.ts boots, e.g. 6.1.0-57-amd64
#     kernel/<version>/boot/vmlinuz-<version>
#     kernel/<version>/lib/modules/<version>/...   (with modules.dep from depmod)
#     initramfs-*.cpio.gz       built by guest.ts, keyed by kernel version and init script
#     qga/usr/sbin/qemu-ga      the guest agent (package qemu-guest-agent, extracted the same
#                               way); guest.ts copies it and the host libraries `ldd` lists
#                               into a guest's root filesystem (same Debian release)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
CACHE=${DISKSNAP_GUEST_CACHE:-/var/tmp/disksnap-guest}
PACKAGES="qemu-system-x86 busybox-static kmod e2fsprogs"

need=""
for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"; done
if [ -n "$need" ]; then
  echo "guest-setup: installing$need" >&2
  apt-get install -y -qq --no-install-recommends $need >&2
fi
PATH=$PATH:/usr/sbin:/sbin

# The kernel the linux-image-amd64 metapackage points at (an exact, versioned package name).
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
  echo "guest-setup: apt-cache knows no linux-image-amd64 (run apt-get update)" >&2
  exit 1
fi
ver=${pkg#linux-image-}
mkdir -p "$CACHE/kernel"
if [ ! -f "$CACHE/kernel/$ver/boot/vmlinuz-$ver" ] || [ ! -f "$CACHE/kernel/$ver/lib/modules/$ver/modules.dep" ]; then
  tmp=$(mktemp -d "$CACHE/.fetch.XXXXXX")
  chmod 755 "$tmp" # apt-get download runs as _apt where it can
  trap 'rm -rf "$tmp"' EXIT
  echo "guest-setup: fetching $pkg" >&2
  (cd "$tmp" && apt-get download -q "$pkg" >&2)
  dpkg -x "$tmp"/"$pkg"_*.deb "$tmp/root"
  depmod -b "$tmp/root" "$ver"
  rm -rf "$CACHE/kernel/$ver"
  mv "$tmp/root" "$CACHE/kernel/$ver"
fi
echo "$ver" >"$CACHE/kernel.version.tmp"
mv "$CACHE/kernel.version.tmp" "$CACHE/kernel.version"
echo "guest-setup: kernel $ver ready in $CACHE" >&2

# qemu-guest-agent for the live storage snapshot test (guest-fsfreeze-freeze/thaw).
if [ ! -x "$CACHE/qga/usr/sbin/qemu-ga" ]; then
  qtmp=$(mktemp -d "$CACHE/.fetch.XXXXXX")
  chmod 755 "$qtmp"
  trap 'rm -rf "${tmp:-}" "$qtmp"' EXIT
  echo "guest-setup: fetching qemu-guest-agent" >&2
  (cd "$qtmp" && apt-get download -q qemu-guest-agent >&2)
  dpkg -x "$qtmp"/qemu-guest-agent_*.deb "$qtmp/root"
  rm -rf "$CACHE/qga"
  mv "$qtmp/root" "$CACHE/qga"
fi
echo "guest-setup: qemu-ga ready in $CACHE/qga" >&2
