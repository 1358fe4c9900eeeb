#!/usr/bin/env bash
# Helpers shared by the testbed scripts. Source it; it defines paths and functions only.

TB_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TB_SRC="$TB_REPO/resources/testbed"
# Everything built is cached here (never committed: target/ is ignored).
TB_OUT="${TB_OUT:-$TB_REPO/target/testbed}"

tb_log() { echo "testbed: $*" >&2; }
tb_die() { echo "testbed: error: $*" >&2; exit 1; }

# The newest kernel under /lib/modules that also has its vmlinuz in /boot: that is the Debian
# kernel the L1 and L2 guests run (the running kernel of the host is irrelevant).
tb_kernel_version() {
  local v best=""
  for v in $(ls -1 /lib/modules 2>/dev/null | sort -V); do
    [[ -f "/boot/vmlinuz-$v" ]] && best="$v"
  done
  [[ -n "$best" ]] || tb_die "no kernel with /lib/modules/<v> and /boot/vmlinuz-<v> (install linux-image-amd64)"
  echo "$best"
}

# Copies a dynamically linked binary into ROOT at DEST (default: its own path), with every library
# ldd lists, at the paths ldd gives, so the dynamic loader finds them inside the guest.
tb_copy_bin() {
  local root="$1" bin="$2" dest="${3:-$2}" lib
  install -D -m 0755 "$bin" "$root$dest"
  while read -r lib; do
    [[ -n "$lib" && -e "$lib" ]] || continue
    [[ -e "$root$lib" ]] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done < <(ldd "$bin" 2>/dev/null | awk '/=> \//{print $3} /^[ \t]*\/[^ ]+ \(/{print $1}')
}

# Writes to ROOT/modules/<name>.ko the modules named plus their dependencies (modprobe order,
# duplicates removed), decompressing .ko.xz/.ko.zst/.ko.gz, and prints the in-guest paths in load order.
# TB_MODROOT names another root holding lib/modules/KVER (an unpacked kernel package).
tb_copy_modules() {
  local root="$1" kver="$2"; shift 2
  local seen=" " m path base out
  mkdir -p "$root/modules"
  for m in "$@"; do
    while read -r _ path _; do
      [[ "$seen" == *" $path "* ]] && continue
      seen+="$path "
      base="$(basename "$path")"; base="${base%.xz}"; base="${base%.zst}"; base="${base%.gz}"
      out="$root/modules/$base"
      case "$path" in
        *.xz) xz -dc "$path" >"$out" ;;
        *.zst) zstd -qdc "$path" >"$out" ;;
        *.gz) gzip -dc "$path" >"$out" ;;
        *) cp "$path" "$out" ;;
      esac
      echo "/modules/$base"
    done < <(modprobe -d "${TB_MODROOT:-/}" -S "$kver" --show-depends "$m" | grep '^insmod ')
  done
}

# Assembles in ROOT the L1 initramfs and writes it to OUT (uncompressed: L0 loads it in one go and
# L1 unpacks it without decompressing under TCG): busybox, the MODULES of kernel KVER (loaded in
# that order, with their dependencies), QEMU with its firmware, strace, fio, tb-vfio-bind, and the
# L2 kernel and initramfs under /testbed/.
# Usage: tb_l1_base ROOT KVER L2_VMLINUZ L2_INITRD OUT MODULE...
tb_l1_base() {
  local l1="$1" kver="$2" l2_kernel="$3" l2_initrd="$4" out="$5" fw
  shift 5
  mkdir -p "$l1"/{proc,sys,dev,tmp,run,testbed/bin}
  tb_install_busybox "$l1"
  install -m 0755 "$TB_SRC/l1-init.sh" "$l1/init"
  tb_copy_modules "$l1" "$kver" "$@" >"$l1/testbed/l1-modules.list"
  tb_copy_bin "$l1" /usr/bin/qemu-system-x86_64
  tb_copy_bin "$l1" /usr/bin/strace
  # fio brings 80 MB of libraries (ceph, gluster...): measured, it adds well under a second to L1's boot.
  tb_copy_bin "$l1" /usr/bin/fio
  # QEMU finds its firmware next to its binary (../share/qemu) and in Debian's seabios directory;
  # with -kernel and -nodefaults it loads bios-256k.bin, linuxboot_dma.bin and kvmvapic.bin.
  mkdir -p "$l1/usr/share/qemu" "$l1/usr/share/seabios"
  cp -L /usr/share/seabios/*.bin "$l1/usr/share/seabios/"
  for fw in kvmvapic.bin linuxboot.bin linuxboot_dma.bin multiboot.bin multiboot_dma.bin pvh.bin; do
    cp -L "/usr/share/qemu/$fw" "$l1/usr/share/qemu/"
  done
  install -m 0755 "$TB_SRC/tb-vfio-bind.sh" "$l1/testbed/bin/tb-vfio-bind"
  cp "$l2_kernel" "$l1/testbed/vmlinuz"
  cp "$l2_initrd" "$l1/testbed/l2.cpio.gz"
  echo "$kver" >"$l1/testbed/kernel-version"
  tb_cpio "$l1" >"$out"
}

# Busybox with a symlink for every applet it has.
tb_install_busybox() {
  local root="$1" applet
  install -D -m 0755 /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list-full); do
    [[ -e "$root/$applet" ]] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -s /bin/busybox "$root/$applet"
  done
}

# A reproducible newc cpio of directory ROOT on stdout.
tb_cpio() {
  (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible)
}

# Writes to OUT the benchmarks' L2 initramfs: the testbed's (uncompressed, so the two archives
# concatenate without alignment trouble) + an overlay with fio, its libraries and the benchmark
# action (bench-viommu-io.sh as /tb/actions/bench-io.sh).
tb_bench_l2_initrd() {
  local out="$1" ov
  ov="$(mktemp -d)"
  mkdir -p "$ov/tb/actions"
  tb_copy_bin "$ov" /usr/bin/fio
  install -m 0644 "$TB_SRC/bench-viommu-io.sh" "$ov/tb/actions/bench-io.sh"
  { gzip -dc "$TB_OUT/l2.cpio.gz"; tb_cpio "$ov"; } >"$out"
  rm -rf "$ov"
}

# Builds the testbed (build.sh) and, unless VMM names a binary, our vmm (release, its own target
# directory: a `cargo test` may hold target/'s lock); prints the vmm's path. Usage:
#   vmm=$(tb_build_with_vmm "$vmm")
tb_build_with_vmm() {
  bash "$TB_SRC/build.sh" >&2
  if [[ -n "$1" ]]; then
    echo "$1"
    return
  fi
  (cd "$TB_REPO" && cargo build --release -q -p vmm --bin vmm --target-dir "$TB_OUT/cargo") >&2
  echo "$TB_OUT/cargo/release/vmm"
}
