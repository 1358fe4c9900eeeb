#!/usr/bin/env bash
# Makes the initrd of one L1 run: the cached base (build.sh) + a small per-run overlay cpio. Linux unpacks concatenated cpio archives in order, later files winning, so choosing
# a scenario never rebuilds the base.
# Usage: mkinitrd.sh --out FILE [--base FILE] [--vmm PATH] [--script FILE] [--add SRC=DEST]...
#   --base FILE    the base to extend (default target/testbed/l1-base.cpio; build-l1-iommufd.sh makes another)
#   --vmm PATH     installed as /testbed/bin/vmm with the libraries ldd lists
#   --script FILE  installed as /testbed/scenario.sh, which the L1 init runs
#   --add SRC=DEST any other file, at DEST inside L1 (with its libraries if it is a dynamic executable)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

out="" base="$TB_OUT/l1-base.cpio" vmm="" script="" adds=()
while (($#)); do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    --vmm) vmm="$2"; shift 2 ;;
    --script) script="$2"; shift 2 ;;
    --add) adds+=("$2"); shift 2 ;;
    *) tb_die "mkinitrd.sh: unknown argument $1" ;;
  esac
done
[[ -n "$out" ]] || tb_die "mkinitrd.sh: --out is required"
[[ -s "$base" ]] || tb_die "no base $base: run resources/testbed/build.sh (or build-l1-iommufd.sh)"

ov="$(mktemp -d)"
trap 'rm -rf "$ov"' EXIT
mkdir -p "$ov/testbed/bin"
if [[ -n "$vmm" ]]; then
  [[ -x "$vmm" ]] || tb_die "vmm binary $vmm is not an executable file"
  tb_copy_bin "$ov" "$(readlink -f "$vmm")" /testbed/bin/vmm
fi
[[ -z "$script" ]] || install -m 0755 "$script" "$ov/testbed/scenario.sh"
for a in ${adds[@]+"${adds[@]}"}; do
  src="${a%%=*}" dest="${a#*=}"
  if ldd "$src" >/dev/null 2>&1; then
    tb_copy_bin "$ov" "$(readlink -f "$src")" "$dest" # a dynamic executable: its libraries too
  else
    install -D -m 0755 "$src" "$ov/$dest"
  fi
done

mkdir -p "$(dirname "$out")"
{
  cat "$base"
  tb_cpio "$ov"
} >"$out.tmp"
mv -f "$out.tmp" "$out"
