//! The binary's command line: help, version, and one clear line plus a non-zero exit for each
//! kind of bad input. None of these need KVM.

use std::path::PathBuf;
use std::process::{Command, Output};

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run the vmm binary")
}

/// Asserts a failure with exactly one stderr line that contains `needle`.
fn fails_with(args: &[&str], needle: &str) {
    let out = vmm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "args {args:?}: stderr {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "args {args:?}: want one line, got {stderr:?}"
    );
    assert!(lines[0].starts_with("vmm: error: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "args {args:?}: {stderr:?} lacks {needle:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty());
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the test's temp dir");
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write a test file");
    p
}

#[test]
fn help_and_version() {
    let out = vmm(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Usage: vmm --kernel PATH"), "{text}");
    assert!(text.contains("--memory size=SIZE"));
    assert!(text.contains("intremap=on|off (default on"), "{text}");
    let out = vmm(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("vmm {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bad_arguments() {
    fails_with(&[], "missing --kernel PATH");
    fails_with(
        &["--kernel", "/k", "--frobnicate"],
        "unknown argument '--frobnicate'",
    );
    fails_with(&["--kernel"], "option --kernel needs a value");
    fails_with(
        &["--kernel", "/k", "--cpus", "boot=0"],
        "--cpus: invalid boot '0'",
    );
    fails_with(
        &["--kernel", "/k", "--cpus", "boot=two"],
        "--cpus: invalid boot 'two'",
    );
    fails_with(
        &["--kernel", "/k", "--cpus", "4"],
        "--cpus: expected key=value, got '4'",
    );
    fails_with(
        &["--kernel", "/k", "--memory", "size=12Q"],
        "--memory: invalid size '12Q'",
    );
}

#[test]
fn caching_mode_off_with_a_passed_through_device_is_refused_in_one_line() {
    fails_with(
        &[
            "--kernel",
            "/k",
            "--viommu",
            "caching-mode=off",
            "--device",
            "path=/sys/bus/pci/devices/0000:01:00.0,iommu=on",
        ],
        "--viommu: invalid caching-mode 'off with --device \
         /sys/bus/pci/devices/0000:01:00.0': caching-mode=off cannot have a passed-through \
         device behind the unit: the host can only follow the guest's tables when the guest \
         invalidates on every change, which is what caching mode asks of it",
    );
    let out = vmm(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for option in [
        "caching-mode=on|off",
        "check-report=PATH",
        "inject=SPEC",
        "records-full@N",
    ] {
        assert!(text.contains(option), "--help lacks {option}");
    }
}

#[test]
fn too_little_memory() {
    fails_with(
        &["--kernel", "/k", "--memory", "size=16M"],
        "--memory: invalid size '16M': at least 32M is needed",
    );
}

#[test]
fn missing_kernel() {
    fails_with(
        &["--kernel", "/nonexistent/bzImage"],
        "cannot open kernel /nonexistent/bzImage: No such file or directory",
    );
}

#[test]
fn kernel_that_is_not_a_bzimage() {
    let k = temp_file("not-a-bzimage", b"#!/bin/sh\necho this is no kernel\n");
    fails_with(
        &["--kernel", k.to_str().unwrap()],
        &format!(
            "kernel {} is neither a bzImage (no 'HdrS' magic at offset 0x202) nor a multiboot kernel",
            k.display()
        ),
    );
    let elf = temp_file("vmlinux-like", &[0x7f, b'E', b'L', b'F'].repeat(512));
    fails_with(
        &["--kernel", elf.to_str().unwrap()],
        "no 'HdrS' magic at offset 0x202",
    );
}

/// A file with just a bzImage setup header (protocol 2.15, loaded high): it passes the
/// up-front kernel check, so whatever comes next is what fails.
fn fake_bzimage(name: &str) -> PathBuf {
    let mut hdr = vec![0u8; 0x400];
    hdr[0x202..0x206].copy_from_slice(b"HdrS");
    hdr[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    hdr[0x211] = 1;
    temp_file(name, &hdr)
}

#[test]
fn missing_initramfs() {
    let k = fake_bzimage("fake-bzimage");
    fails_with(
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--initramfs",
            "/nonexistent/initrd",
        ],
        "cannot read initramfs /nonexistent/initrd",
    );
}

#[test]
fn more_memory_than_the_host_has() {
    // The memory check comes before KVM is touched.
    let k = fake_bzimage("fake-bzimage-mem");
    fails_with(
        &["--kernel", k.to_str().unwrap(), "--memory", "size=64T"],
        "--memory size of 67108864 MiB is more than the host's",
    );
}

#[test]
fn more_vcpus_than_kvm_allows_fail_naming_its_limit() {
    if !std::path::Path::new("/dev/kvm").exists() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "/dev/kvm is missing"
        );
        eprintln!("SKIPPED: /dev/kvm is missing");
        return;
    }
    // KVM_CAP_MAX_VCPUS is at most 4096 on any x86 KVM.
    let k = fake_bzimage("fake-bzimage-cpus");
    fails_with(
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "size=64M",
            "--viommu",
            "--cpus",
            "boot=100000",
        ],
        "100000 vCPUs asked, KVM allows at most",
    );
    fails_with(
        &["--kernel", k.to_str().unwrap(), "--cpus", "boot=256"],
        "--cpus: invalid boot '256': more than 255 vCPUs need APIC IDs above 254",
    );
}

#[test]
fn no_dev_kvm() {
    // Hide /dev behind an empty tmpfs in a private mount namespace (needs root and unshare).
    let k = fake_bzimage("fake-bzimage-nokvm");
    let script = format!(
        "mount -t tmpfs none /dev && exec {} --kernel {} --memory size=64M",
        env!("CARGO_BIN_EXE_vmm"),
        k.display()
    );
    let out = match Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
    {
        Ok(o) if !String::from_utf8_lossy(&o.stderr).contains("unshare failed") => o,
        other => {
            let msg = format!("cannot make a mount namespace without /dev/kvm: {other:?}");
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{msg}");
            }
            eprintln!("SKIPPED no_dev_kvm: {msg}");
            return;
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "vmm: error: cannot open /dev/kvm: No such file or directory (os error 2) \
         (is KVM available and accessible?)"
    );
}

#[test]
fn bad_device_fails_with_its_fix_before_anything_is_built() {
    // The kernel does not exist either: the device is checked first, so nothing is built.
    fails_with(
        &[
            "--kernel",
            "/nonexistent/bzImage",
            "--device",
            "path=/sys/bus/pci/devices/0000:ff:1f.7",
        ],
        "no such PCI device; give /sys/bus/pci/devices/DDDD:BB:DD.F",
    );
    fails_with(
        &["--kernel", "/k", "--device", "path=/tmp"],
        "not a PCI device address",
    );
    // A real device of this host that is not bound to vfio-pci, if there is one.
    let not_vfio = std::fs::read_dir("/sys/bus/pci/devices")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::read_link(p.join("driver")).map_or(true, |d| !d.ends_with("vfio-pci")));
    if let Some(dev) = not_vfio {
        let arg = format!("path={}", dev.display());
        fails_with(
            &["--kernel", "/nonexistent/bzImage", "--device", &arg],
            "not vfio-pci; bind it with",
        );
    }
}
