#!/usr/bin/env bash
# The OpenZFS 2.3 test guest (tests/harness/openzfs.py boots it; see ../shared/notes/openzfs-guest.md):
# Debian 12 with its kernel and zfs-dkms/zfsutils-linux 2.3 from bookworm-backports, built once with
# debootstrap and cached under $HOSTER_GUEST_CACHE (/var/cache/hoster-tasks) in openzfs-guest-<key>/,
# key = sha256 of this script and the project's runtime dependencies, so a recipe change rebuilds it.
#
#   openzfs-guest.sh build   build the image unless the cache has it (root; flock against concurrent builds)
#   openzfs-guest.sh path    print the cache directory of the current recipe (built or not)
#   openzfs-guest.sh key     print the recipe key
#
# The cache directory holds: root.img (ext4, raw), vmlinuz, initrd.img, id_ed25519{,.pub} (the harness's
# key, root's authorized key in the guest), ssh_host_ed25519_key.pub (the guest's host key), versions.
# In the guest: /opt/hoster-tasks, a venv with the runtime dependencies (not the project: the harness copies
# the checkout in at every boot); /root/.ssh/id_ed25519 and /root/.ssh/known_hosts, with which the
# guest's worker reaches the guest's own sshd on 127.0.0.1 as a replication target.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
project=$(dirname "$here")
self="$here/$(basename "$0")"
cache_root=${HOSTER_GUEST_CACHE:-/var/cache/hoster-tasks}
suite=bookworm

die() { echo "openzfs-guest: $*" >&2; exit 1; }

# The project's runtime dependencies, one per line, from pyproject.toml (the venv in the image has these).
deps() {
  python3 - "$project/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as fh:
    print("\n".join(tomllib.load(fh)["project"]["dependencies"]))
EOF
}

key() { { cat "$self"; deps; } | sha256sum | cut -c1-16; }
cache_dir() { echo "$cache_root/openzfs-guest-$(key)"; }

# The Debian mirror the host's apt uses (deb822 or one-line sources), deb.debian.org otherwise.
mirror() {
  local m
  m=$(grep -hoE '^URIs:\s*\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' |
    grep -vE 'security|nodesource|google' | head -n1 || true)
  if [[ -z $m ]]; then
    m=$(grep -hoE '^deb\s+(\[[^]]*\]\s+)?\S+\s+bookworm\s' /etc/apt/sources.list 2>/dev/null |
      awk '{print $(NF-1)}' | head -n1 || true)
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

phase_start=0
phase() { # phase NAME: print how long the previous phase took, then start NAME
  local now
  now=$(date +%s)
  if [[ -n ${phase_name:-} ]]; then
    printf 'openzfs-guest: %-28s %4ds\n' "$phase_name" $((now - phase_start)) >&2
  fi
  phase_name=${1:-}
  phase_start=$now
  [[ -z $phase_name ]] || echo "openzfs-guest: -- $phase_name" >&2
}

in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
  DEBIAN_FRONTEND=noninteractive "$@"; }

mounted=()
umount_all() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done
  mounted=()
}

build() {
  [[ $(id -u) == 0 ]] || die "build needs root (debootstrap, chroot)"
  local dir
  dir=$(cache_dir)
  if [[ -f $dir/root.img ]]; then
    echo "openzfs-guest: cached image $dir" >&2
    return 0
  fi
  for tool in debootstrap mkfs.ext4 ssh-keygen chroot flock; do
    command -v "$tool" >/dev/null || die "missing $tool (scripts/bootstrap.sh installs it)"
  done
  mkdir -p "$cache_root"
  exec 9>"$cache_root/.openzfs-guest.lock"
  flock 9
  if [[ -f $dir/root.img ]]; then # another build finished while we waited
    echo "openzfs-guest: cached image $dir (built by a concurrent run)" >&2
    return 0
  fi

  local t0 mirror_url
  t0=$(date +%s)
  tmp=$(mktemp -d "$cache_root/.build-$(key).XXXXXX")
  root=$tmp/root
  trap 'umount_all; rm -rf "$tmp"' EXIT
  mirror_url=$(mirror)
  echo "openzfs-guest: building $dir from $mirror_url" >&2

  phase "debootstrap"
  debootstrap --variant=minbase \
    --include=systemd-sysv,udev,openssh-server,iproute2,kmod,pv,mbuffer,procps,psmisc,python3,python3-venv,ca-certificates \
    "$suite" "$root" "$mirror_url" >"$tmp/debootstrap.log" 2>&1 ||
    { tail -n 40 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }

  phase "kernel"
  for m in proc sys dev dev/pts; do
    case $m in
    proc) mount -t proc proc "$root/proc" ;;
    sys) mount -t sysfs sys "$root/sys" ;;
    *) mount --bind "/$m" "$root/$m" ;;
    esac
    mounted+=("$root/$m")
  done
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  # no services start inside the chroot (zfs-zed, ssh)
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"
  local security=${mirror_url%/debian}/debian-security
  cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror_url $suite main contrib
deb $mirror_url $suite-updates main contrib
deb $mirror_url $suite-backports main contrib
deb $security $suite-security main contrib
EOF
  in_root apt-get update -q >"$tmp/apt.log" 2>&1 || { tail -n 40 "$tmp/apt.log" >&2; die "apt-get update failed"; }
  local kver
  kver=$(in_root apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: linux-image-\(.*-amd64\)$/\1/p' | head -n1)
  [[ -n $kver ]] || die "cannot tell which kernel linux-image-amd64 depends on"
  echo "openzfs-guest: kernel $kver" >&2
  in_root apt-get install -y -q --no-install-recommends \
    "linux-image-$kver" "linux-headers-$kver" initramfs-tools </dev/null >>"$tmp/apt.log" 2>&1 ||
    { tail -n 40 "$tmp/apt.log" >&2; die "kernel install failed"; }

  phase "zfs-dkms (builds zfs.ko)"
  in_root apt-get install -y -q --no-install-recommends -t "$suite-backports" \
    dkms zfs-dkms zfsutils-linux </dev/null >>"$tmp/apt.log" 2>&1 ||
    { tail -n 60 "$tmp/apt.log" >&2; die "zfs-dkms/zfsutils-linux install failed"; }
  local status
  status=$(in_root dkms status 2>&1 || true)
  echo "openzfs-guest: dkms status: $status" >&2
  grep -qE "^zfs/2\.3[^,]*, $kver, x86_64: installed" <<<"$status" ||
    { tail -n 60 "$tmp/apt.log" >&2; die "dkms did not install zfs for kernel $kver (dkms status: $status)"; }
  local zfsver
  zfsver=$(in_root dpkg-query -W -f='${Version}' zfsutils-linux)

  phase "venv /opt/hoster-tasks"
  # the host's CA bundle: it is the one that reaches the package index from this machine
  cp /etc/ssl/certs/ca-certificates.crt "$root/tmp/host-ca.crt"
  deps >"$root/tmp/requirements.txt"
  in_root python3 -m venv /opt/hoster-tasks
  in_root /opt/hoster-tasks/bin/pip install -q --disable-pip-version-check --cert /tmp/host-ca.crt \
    -r /tmp/requirements.txt >"$tmp/pip.log" 2>&1 || { tail -n 40 "$tmp/pip.log" >&2; die "pip install failed"; }
  in_root /opt/hoster-tasks/bin/python -c 'import celery, redis, fabric, pydantic_settings, sentry_sdk' ||
    die "the venv cannot import the dependencies"
  rm -f "$root/tmp/host-ca.crt" "$root/tmp/requirements.txt"

  phase "guest settings"
  echo openzfs-guest >"$root/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 openzfs-guest\n' >"$root/etc/hosts"
  echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$root/etc/fstab"
  echo zfs >"$root/etc/modules-load.d/zfs.conf"
  cat >"$root/etc/systemd/network/10-en.network" <<'EOF'
[Match]
Name=en*

[Network]
DHCP=yes
EOF
  cat >"$root/etc/ssh/sshd_config.d/hoster-tests.conf" <<'EOF'
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
# the tests and Fabric open many connections at once
MaxStartups 200
MaxSessions 100
EOF
  in_root systemctl enable ssh systemd-networkd >/dev/null 2>&1
  # nothing the tests do not need: timers that would run apt or fstrim in the middle of a test
  in_root systemctl disable apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
    >/dev/null 2>&1 || true
  in_root systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1 || true
  rm -f "$root/usr/sbin/policy-rc.d" "$root/etc/resolv.conf"
  install -d -m 700 "$root/root/.ssh"
  ssh-keygen -q -t ed25519 -N '' -C hoster-tests-harness -f "$tmp/id_ed25519"
  ssh-keygen -q -t ed25519 -N '' -C hoster-tests-guest-worker -f "$root/root/.ssh/id_ed25519"
  cat "$tmp/id_ed25519.pub" "$root/root/.ssh/id_ed25519.pub" >"$root/root/.ssh/authorized_keys"
  # the guest's worker replicates to the guest's own sshd: its host keys, as 127.0.0.1
  local k
  for k in "$root"/etc/ssh/ssh_host_*_key.pub; do
    echo "127.0.0.1 $(cut -d' ' -f1,2 "$k")"
  done >"$root/root/.ssh/known_hosts"
  chmod 600 "$root/root/.ssh/authorized_keys" "$root/root/.ssh/known_hosts"
  cp "$root/etc/ssh/ssh_host_ed25519_key.pub" "$tmp/ssh_host_ed25519_key.pub"
  cp -L "$root/boot/vmlinuz-$kver" "$tmp/vmlinuz"
  cp -L "$root/boot/initrd.img-$kver" "$tmp/initrd.img"
  chmod 644 "$tmp/vmlinuz" "$tmp/initrd.img"
  in_root apt-get clean
  umount_all

  phase "mkfs.ext4 -d"
  mkfs.ext4 -q -F -L hoster-root -d "$root" "$tmp/root.img" 4G
  rm -rf "$root"
  printf 'kernel=%s\nzfs=%s\nmirror=%s\nbuilt=%s\n' "$kver" "$zfsver" "$mirror_url" "$(date -u +%FT%TZ)" \
    >"$tmp/versions"
  phase

  rm -rf "$dir" # a partial directory of an older layout, never a complete one (root.img is checked above)
  mv "$tmp" "$dir"
  trap - EXIT
  echo "openzfs-guest: built $dir in $(($(date +%s) - t0))s (kernel $kver, zfs $zfsver)" >&2
}

case ${1:-} in
build) build ;;
path) cache_dir ;;
key) key ;;
*) echo "usage: $0 build|path|key" >&2; exit 2 ;;
esac
