#!/usr/bin/env bash
# Install what hoster-tasks needs on Debian 12 (root): the system packages the sandbox and the tests use,
# then the Python package with its dev extras. Safe to run again; installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(zfs-fuse redis-server redis-sentinel openssh-server pv mbuffer sanoid chromium iproute2 procps psmisc prometheus
  # the OpenZFS 2.3 guest of tests/openzfs: built by scripts/openzfs-guest.sh, booted under QEMU (TCG)
  qemu-system-x86 qemu-utils debootstrap e2fsprogs util-linux)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  # keep package scripts from starting services (redis on 6379, sshd, prometheus): the sandbox and the
  # tests start their own
  policy=/usr/sbin/policy-rc.d
  added_policy=no
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=yes
  fi
  trap '[[ $added_policy == yes ]] && rm -f "$policy"' EXIT
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
fi

python3 -m pip install -q -e '.[dev]' </dev/null

# The OpenZFS 2.3 guest image of tests/openzfs (built once, about 7-10 minutes; cached by its recipe under
# /var/cache/hoster-tasks). `make test` does not wait for it here: pytest builds it in the background while
# the zfs-fuse tests run (tests/conftest.py). --with-openzfs-guest builds it now; a failed build fails
# bootstrap with its cause.
if [[ ${1:-} == --with-openzfs-guest ]]; then
  bash scripts/openzfs-guest.sh build </dev/null
fi
