#!/usr/bin/env bash
# Installs the Debian packages the nested testbed is built from, when any is missing, and makes
# bookworm-backports known to apt (build-l1-iommufd.sh downloads its 6.12 kernel packages).
set -euo pipefail
pkgs=(qemu-system-x86 linux-image-amd64 busybox-static cpio strace fio kmod xz-utils gcc make)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
update=0
backports=/etc/apt/sources.list.d/testbed-bookworm-backports.list
if ! apt-cache madison linux-image-amd64 2>/dev/null | grep -q bookworm-backports; then
  echo "testbed: adding bookworm-backports to apt's sources ($backports)"
  echo 'deb http://deb.debian.org/debian bookworm-backports main' >"$backports"
  update=1
fi
((${#missing[@]})) && update=1
export DEBIAN_FRONTEND=noninteractive
((update)) && apt-get update -qq
if ((${#missing[@]})); then
  echo "testbed: installing ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
