//! Multiboot kernels through the real vmm binary on this machine's KVM: a probe of our own that
//! checks the multiboot entry state, boot information, fw_cfg and isa-debug-exit, then tests of
//! kvm-unit-tests' PASS list (the suite built from the shared tarball), each run as the suite's
//! runner runs it under QEMU and judged as the runner judges it: exit status 1 (the guest wrote
//! 0 to isa-debug-exit) and, for tests that report, every line a PASS. Last, every test on the
//! pass list kept in `tests/kvm-unit-tests/qemu-passes.txt` (what QEMU passes here) with its
//! `unittests.cfg` options mapped to ours, two at a time, as `resources/kvm-unit-tests.sh
//! --pass-list` runs them.
//!
//! Without /dev/kvm, the tarball or a compiler these tests skip loudly, and fail when CI=true.

use std::path::PathBuf;
use std::time::Duration;

use iced_x86::code_asm::*;
use integration::kvm_unit_tests::pass_list;
use integration::kvm_unit_tests::runner::{parallel, Suite};
use integration::kvm_unit_tests::table::render_text;
use integration::kvm_unit_tests::{
    run_test, run_vmm, skip_unless, suite, vmm_binary, Options, Run,
};
use integration::small_guest::kvm_available;

/// unittests.cfg's default is 90 s; these take seconds on QEMU and on us.
const TIMEOUT: Duration = Duration::from_secs(60);
/// The runner's verdict for a guest that wrote 0 to isa-debug-exit: (0 << 1) | 1.
const STATUS_PASS: i32 = 1;

/// The probe's physical load address and stack.
const PROBE_LOAD: u32 = 0x20_0000;
const PROBE_STACK_TOP: u32 = PROBE_LOAD + 0x1_0000;
const MULTIBOOT_MAGIC: u32 = 0x1bad_b002;
/// Boot information flags we give: memory, cmdline, modules, memory map, loader name.
const INFO_FLAGS: u32 = 1 | 1 << 2 | 1 << 3 | 1 << 6 | 1 << 9;
/// What the probe writes to isa-debug-exit when all went well, and when something did not.
const PROBE_OK: u32 = 0x21;
const PROBE_BAD: u32 = 0x7e;

/// Runs the suite's `x86/<flat>`, or returns `None` after saying why it cannot run here.
fn kut(flat: &str, opts: &Options) -> Option<Run> {
    if !kvm_available() {
        return None;
    }
    skip_unless(suite())?;
    Some(run_test(flat, opts, TIMEOUT).unwrap_or_else(|e| panic!("running {flat}: {e}")))
}

fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-kut-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("temp file");
    path
}

/// 32-bit code at PROBE_LOAD, multiboot header first: checks EAX and the information flags,
/// prints the command line, the first module's bytes, fw_cfg's signature and CPU count, and
/// leaves through isa-debug-exit.
fn probe_code() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut fail = a.create_label();
    let mut putc = a.create_label();
    let mut puts = a.create_label();
    let mut mod_loop = a.create_label();
    let mut mod_done = a.create_label();
    let mut sig_loop = a.create_label();

    a.dd(&[MULTIBOOT_MAGIC, 0, 0u32.wrapping_sub(MULTIBOOT_MAGIC)])?;
    a.mov(esp, PROBE_STACK_TOP)?;
    a.cmp(eax, 0x2bad_b002u32)?;
    a.jne(fail)?;
    a.cmp(dword_ptr(ebx), INFO_FLAGS)?;
    a.jne(fail)?;
    // The command line, then a newline.
    a.mov(esi, dword_ptr(ebx + 16))?;
    a.call(puts)?;
    a.mov(al, b'\n' as u32)?;
    a.call(putc)?;
    // One module: its bytes.
    a.cmp(dword_ptr(ebx + 20), 1u32)?;
    a.jne(fail)?;
    a.mov(edi, dword_ptr(ebx + 24))?;
    a.mov(esi, dword_ptr(edi))?;
    a.mov(ecx, dword_ptr(edi + 4))?;
    a.set_label(&mut mod_loop)?;
    a.cmp(esi, ecx)?;
    a.jae(mod_done)?;
    a.mov(al, byte_ptr(esi))?;
    a.call(putc)?;
    a.inc(esi)?;
    a.jmp(mod_loop)?;
    a.set_label(&mut mod_done)?;
    // fw_cfg: select the signature with a 16-bit write, read four bytes.
    a.mov(dx, 0x510u32)?;
    a.mov(ax, 0u32)?;
    a.out(dx, ax)?;
    a.mov(ecx, 4u32)?;
    a.set_label(&mut sig_loop)?;
    a.mov(dx, 0x511u32)?;
    a.in_(al, dx)?;
    a.call(putc)?;
    a.dec(ecx)?;
    a.jnz(sig_loop)?;
    // The CPU count (key 5), as a digit.
    a.mov(dx, 0x510u32)?;
    a.mov(ax, 5u32)?;
    a.out(dx, ax)?;
    a.mov(dx, 0x511u32)?;
    a.in_(al, dx)?;
    a.add(al, b'0' as u32)?;
    a.call(putc)?;
    a.mov(dx, 0xf4u32)?;
    a.mov(eax, PROBE_OK)?;
    a.out(dx, eax)?;
    a.hlt()?;
    a.set_label(&mut fail)?;
    a.mov(dx, 0xf4u32)?;
    a.mov(eax, PROBE_BAD)?;
    a.out(dx, eax)?;
    a.hlt()?;
    // putc: AL to COM1.
    a.set_label(&mut putc)?;
    a.push(edx)?;
    a.mov(dx, 0x3f8u32)?;
    a.out(dx, al)?;
    a.pop(edx)?;
    a.ret()?;
    // puts: the NUL-terminated string at ESI.
    a.set_label(&mut puts)?;
    a.lodsb()?;
    a.test(al, al)?;
    let mut done = a.create_label();
    a.jz(done)?;
    a.call(putc)?;
    a.jmp(puts)?;
    a.set_label(&mut done)?;
    a.ret()?;
    a.assemble(u64::from(PROBE_LOAD))
}

/// `code` as an ELF32 executable (System V ABI): one PT_LOAD of 64 KiB at PROBE_LOAD, entered
/// right after the 12-byte multiboot header.
fn elf32(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 52;
    const PHDR: usize = 32;
    let mut f = vec![0u8; EHDR + PHDR];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 1; // ELFCLASS32
    f[5] = 1; // little-endian
    f[6] = 1; // EV_CURRENT
    let put16 =
        |f: &mut Vec<u8>, at: usize, v: u16| f[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put16(&mut f, 16, 2); // ET_EXEC
    put16(&mut f, 18, 3); // EM_386
    put32(&mut f, 20, 1);
    put32(&mut f, 24, PROBE_LOAD + 12); // e_entry
    put32(&mut f, 28, EHDR as u32); // e_phoff
    put16(&mut f, 40, EHDR as u16);
    put16(&mut f, 42, PHDR as u16);
    put16(&mut f, 44, 1);
    put32(&mut f, EHDR, 1); // PT_LOAD
    put32(&mut f, EHDR + 4, (EHDR + PHDR) as u32); // p_offset
    put32(&mut f, EHDR + 8, PROBE_LOAD); // p_vaddr
    put32(&mut f, EHDR + 12, PROBE_LOAD); // p_paddr
    put32(&mut f, EHDR + 16, code.len() as u32); // p_filesz
    put32(&mut f, EHDR + 20, PROBE_STACK_TOP - PROBE_LOAD); // p_memsz
    put32(&mut f, EHDR + 24, 7); // RWX
    f.extend_from_slice(code);
    f
}

#[test]
fn multiboot_probe_sees_the_entry_state_boot_information_and_fw_cfg_and_exits_with_its_status() {
    if !kvm_available() {
        return;
    }
    let Some(_) = skip_unless(vmm_binary()) else {
        return;
    };
    let kernel = temp_file("probe.elf", &elf32(&probe_code().expect("probe assembles")));
    let module = temp_file("probe.env", b"MODULE-BYTES");
    let run = run_vmm(
        &kernel,
        &Options {
            cpus: 2,
            args: "probe-args",
            env: Some(&module),
            ..Options::default()
        },
        TIMEOUT,
    )
    .expect("run the vmm");
    assert_eq!(
        run.code(),
        Some(((PROBE_OK << 1) | 1) as i32),
        "isa-debug-exit status; output:\n{}",
        run.output
    );
    assert_eq!(
        run.output,
        format!("{} probe-args\nMODULE-BYTESQEMU2", kernel.display())
    );
}

/// The protocol checker's report: its `"total"` violations and the report itself.
fn check_total(report: &std::path::Path) -> (Option<u64>, String) {
    let json = std::fs::read_to_string(report).unwrap_or_default();
    let total = json
        .split_once("\"total\":")
        .and_then(|(_, rest)| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
        })
        .and_then(|n| n.parse().ok());
    (total, json)
}

#[test]
fn kut_intel_iommu_passes_with_the_protocol_checker_on_and_it_finds_no_violation() {
    // unittests.cfg's options mapped as the pass list maps them, plus the checker; with caching
    // mode as QEMU offers it and off (the hardware path).
    for caching_mode in ["on", "off"] {
        let report = std::env::temp_dir().join(format!(
            "vmm-kut-{}-check-cm-{caching_mode}.json",
            std::process::id()
        ));
        let viommu = format!(
            "intremap=on,eim=off,aw-bits=39,ioapic-sid-check=off,caching-mode={caching_mode},\
             check=on,check-report={}",
            report.display()
        );
        let Some(run) = kut(
            "intel-iommu.flat",
            &Options {
                cpus: 4,
                irqchip: Some("split"),
                viommu: Some(&viommu),
                edu: true,
                ..Options::default()
            },
        ) else {
            return;
        };
        assert_eq!(run.code(), Some(STATUS_PASS), "{viommu}: {}", run.output);
        assert!(run.lines_starting("FAIL").is_empty(), "{}", run.output);
        assert_eq!(run.lines_starting("PASS: ").len(), 11, "{}", run.output);
        let (total, json) = check_total(&report);
        assert_eq!(total, Some(0), "caching-mode={caching_mode}: {json}");
        let _ = std::fs::remove_file(&report);
    }
}

#[test]
fn kut_setjmp_passes_its_ten_checks_and_reads_its_environment_module() {
    // The runner's environment file; a line that is no variable is reported, proving the
    // module reached the test.
    let env = temp_file("setjmp.env", b"TARGET=vmm\nnot a variable\n");
    let Some(run) = kut(
        "setjmp.flat",
        &Options {
            env: Some(&env),
            ..Options::default()
        },
    ) else {
        return;
    };
    assert_eq!(run.code(), Some(STATUS_PASS), "{}", run.output);
    assert_eq!(run.lines_starting("PASS: ").len(), 10, "{}", run.output);
    assert!(run.lines_starting("FAIL").is_empty(), "{}", run.output);
    assert!(run.output.contains("SUMMARY: 10 tests"), "{}", run.output);
    assert!(
        run.output
            .contains("Invalid environment variable: not a variable"),
        "{}",
        run.output
    );
}

#[test]
fn kut_smptest3_brings_up_the_aps_fw_cfg_counts() {
    let Some(run) = kut(
        "smptest.flat",
        &Options {
            cpus: 3,
            ..Options::default()
        },
    ) else {
        return;
    };
    assert_eq!(run.code(), Some(STATUS_PASS), "{}", run.output);
    assert!(run.output.contains("found 3 cpus"), "{}", run.output);
    assert_eq!(
        run.lines_starting("PASS: "),
        ["PASS: IPI to each CPU"],
        "{}",
        run.output
    );
}

#[test]
fn kut_realmode_passes_on_the_bios_timer_and_pc_testdev() {
    let Some(run) = kut("realmode.flat", &Options::default()) else {
        return;
    };
    assert_eq!(run.code(), Some(STATUS_PASS), "{}", run.output);
    assert!(run.lines_starting("FAIL").is_empty(), "{}", run.output);
    // QEMU 7.2 passes 127 checks here, "sti inhibit" (woken by the PIT) among them.
    assert_eq!(run.lines_starting("PASS: ").len(), 127, "{}", run.output);
    assert!(run.output.contains("PASS: sti inhibit"), "{}", run.output);
}

#[test]
fn kut_s3_sleeps_until_the_rtc_alarm_and_resumes_at_the_waking_vector() {
    let Some(run) = kut("s3.flat", &Options::default()) else {
        return;
    };
    // The resume code sends the word at address 0, which the test sets to 1 if the vCPU ran
    // on after the S3 write: status 1 means it slept, woke, and resumed in real mode.
    assert_eq!(run.code(), Some(STATUS_PASS), "{}", run.output);
    assert!(
        run.output.contains("PM1a event registers at 600"),
        "{}",
        run.output
    );
    // The alarm is a second away, after waiting for an RTC update.
    assert!(run.duration >= Duration::from_millis(900), "{run:?}");
}

#[test]
fn kut_s3_with_four_vcpus_parks_every_one_and_wakes_them_with_either_irqchip() {
    for irqchip in ["kernel", "split"] {
        // Three APs idle in the guest when the BSP suspends: the wake only comes once each
        // has left the guest and parked, so a vCPU the run loop failed to get out would leave
        // the VM asleep until the timeout.
        let Some(run) = kut(
            "s3.flat",
            &Options {
                cpus: 4,
                irqchip: Some(irqchip),
                ..Options::default()
            },
        ) else {
            return;
        };
        assert_eq!(run.code(), Some(STATUS_PASS), "{irqchip}: {}", run.output);
        assert!(
            run.output.contains("smp: waiting for 3 APs"),
            "{irqchip}: {}",
            run.output
        );
        assert!(run.duration >= Duration::from_millis(900), "{run:?}");
    }
}

#[test]
fn kut_vmexit_inl_pmtimer_times_the_pm_timer_the_fadt_names() {
    let Some(run) = kut(
        "vmexit.flat",
        &Options {
            args: "inl_from_pmtimer",
            ..Options::default()
        },
    ) else {
        return;
    };
    assert_eq!(run.code(), Some(STATUS_PASS), "{}", run.output);
    assert!(
        run.output.contains("PM timer port is 608"),
        "{}",
        run.output
    );
    assert_eq!(
        run.lines_starting("inl_from_pmtimer ").len(),
        1,
        "{}",
        run.output
    );
}

#[test]
fn kut_every_test_qemu_passes_here_passes_on_ours_with_its_subtests() {
    if !kvm_available() {
        return;
    }
    let Some(dir) = skip_unless(suite()) else {
        return;
    };
    let Some(_) = skip_unless(vmm_binary()) else {
        return;
    };
    let suite = Suite::load(dir).expect("the suite's x86/unittests.cfg");
    let path = pass_list::path();
    let text = std::fs::read_to_string(&path).expect("the pass list");
    let list = pass_list::parse(&text).expect("the pass list parses");
    assert!(
        list.len() >= 19,
        "the shared README's PASS list has 19 tests"
    );
    let notes = Default::default();
    let rows = parallel(&list, 2, |e| {
        suite.run_row(&e.name, false, true, &list, &notes)
    });
    let table = render_text(&rows, false);
    let failures: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let j = r.judgement.as_ref()?;
            let log = r.ours.as_ref().map_or("", |o| o.log.as_str());
            j.is_failure().then(|| format!("{}: {j}\n{log}", r.name))
        })
        .collect();
    assert!(failures.is_empty(), "{table}\n{}", failures.join("\n\n"));
    eprintln!("{table}");
}
