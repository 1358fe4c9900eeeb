#!/usr/bin/env bash
# Installs the Debian packages the nested testbed is built from, when any is missing.
set -euo pipefail
pkgs=(qemu-system-x86 linux-image-amd64 busybox-static cpio strace fio)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "testbed: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
