use super::*;

pub(super) fn run(args: &[&str]) -> VmConfig {
    match parse_args(args.iter().copied()) {
        Ok(Command::Run(c)) => *c,
        other => panic!("unexpected {other:?}"),
    }
}

pub(super) fn err(args: &[&str]) -> String {
    parse_args(args.iter().copied()).unwrap_err().to_string()
}

#[test]
fn device_repeats_in_cloud_hypervisors_form() {
    let c = run(&[
        "--kernel",
        "/k",
        "--device",
        "path=/sys/bus/pci/devices/0000:00:01.0",
        "--device=path=/sys/bus/pci/devices/0000:00:02.0",
    ]);
    let paths: Vec<&PathBuf> = c.devices.iter().map(|d| &d.path).collect();
    assert_eq!(
        paths,
        [
            &PathBuf::from("/sys/bus/pci/devices/0000:00:01.0"),
            &PathBuf::from("/sys/bus/pci/devices/0000:00:02.0")
        ]
    );
    assert!(c.devices.iter().all(|d| !d.iommu && d.backend.is_none()));
    assert_eq!(
        err(&[
            "--kernel",
            "/k",
            "--device",
            "/sys/bus/pci/devices/0000:00:01.0"
        ]),
        "--device: expected key=value, got '/sys/bus/pci/devices/0000:00:01.0'"
    );
    assert_eq!(
        err(&["--kernel", "/k", "--device", "bus=1"]),
        "--device: unknown key 'bus' (known: path, iommu, backend, addr)"
    );
    assert_eq!(
        err(&["--kernel", "/k", "--device", "iommu=on"]),
        "--device: missing path="
    );
    assert_eq!(
        err(&["--kernel", "/k", "--device", "path="]),
        "--device: invalid path '': empty path"
    );
}

#[test]
fn full_command_line() {
    let c = run(&[
        "--kernel",
        "/k",
        "--initramfs",
        "/i",
        "--cmdline",
        "console=ttyS0 quiet",
        "--cpus",
        "boot=2",
        "--memory",
        "size=2G",
    ]);
    assert_eq!(c.kernel, PathBuf::from("/k"));
    assert_eq!(c.initramfs, Some(PathBuf::from("/i")));
    assert_eq!(c.cmdline.as_deref(), Some("console=ttyS0 quiet"));
    assert_eq!(c.vcpus, 2);
    assert_eq!(c.memory_size, 2 << 30);
}

#[test]
fn defaults_and_equals_form() {
    let c = run(&["--kernel=/k", "--memory=size=256M"]);
    assert_eq!(c.vcpus, 1);
    assert_eq!(c.memory_size, 256 << 20);
    // The default depends on the kernel's format (a bzImage gets DEFAULT_CMDLINE):
    // boot::KernelFormat::default_cmdline, tested there.
    assert_eq!(c.cmdline, None);
    assert_eq!(c.initramfs, None);
}

#[test]
fn help_and_version() {
    assert_eq!(parse_args(["--help"]).unwrap(), Command::Help);
    assert_eq!(parse_args(["-h"]).unwrap(), Command::Help);
    assert_eq!(parse_args(["--version"]).unwrap(), Command::Version);
}

#[test]
fn sizes() {
    assert_eq!(parse_size("256M"), Ok(256 << 20));
    assert_eq!(parse_size("2G"), Ok(2 << 30));
    assert_eq!(parse_size("64k"), Ok(64 << 10));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert!(parse_size("").is_err());
    assert!(parse_size("12X").is_err());
    assert!(parse_size("99999999999T").is_err());
}

#[test]
fn errors_name_the_problem() {
    assert_eq!(err(&[]), "missing --kernel PATH (see --help)");
    assert_eq!(err(&["--bogus"]), "unknown argument '--bogus' (see --help)");
    assert_eq!(err(&["--kernel"]), "option --kernel needs a value");
    assert_eq!(
        err(&["--kernel", "a", "--kernel", "b"]),
        "option --kernel given more than once"
    );
    assert_eq!(
        err(&["--kernel", "k", "--cpus", "boot=0"]),
        "--cpus: invalid boot '0': must be 1..=4294967295"
    );
    assert_eq!(
        err(&["--kernel", "k", "--cpus", "2"]),
        "--cpus: expected key=value, got '2'"
    );
    assert_eq!(
        err(&["--kernel", "k", "--cpus", "max=2"]),
        "--cpus: unknown key 'max' (known: boot)"
    );
    assert_eq!(
        err(&["--kernel", "k", "--memory", "size=1M"]),
        "--memory: invalid size '1M': at least 32M is needed"
    );
    assert_eq!(
        err(&["--kernel", "k", "--memory", "size=lots"]),
        "--memory: invalid size 'lots': expected a number with an optional K, M, G or T suffix"
    );
    assert_eq!(
        err(&["--kernel", "k", "--memory", ""]),
        "--memory: missing size="
    );
}

#[test]
fn option_list_reusable_for_later_options() {
    let l = OptionList::parse(
        "--device",
        "path=/sys/bus/pci/devices/0000:00:03.0,iommu=on",
        &["path", "iommu"],
    )
    .unwrap();
    assert_eq!(l.get("path"), Some("/sys/bus/pci/devices/0000:00:03.0"));
    assert_eq!(l.require("iommu"), Ok("on"));
}

#[test]
fn irqchip_is_kernel_unless_split_is_asked_for() {
    assert_eq!(run(&["--kernel", "/k"]).irqchip, Irqchip::Kernel);
    assert_eq!(
        run(&["--kernel", "/k", "--irqchip", "split"]).irqchip,
        Irqchip::Split
    );
    assert_eq!(
        run(&["--kernel", "/k", "--irqchip=kernel"]).irqchip,
        Irqchip::Kernel
    );
    assert_eq!(
        err(&["--kernel", "/k", "--irqchip", "on"]),
        "--irqchip: invalid mode 'on': must be kernel or split"
    );
    assert_eq!(
        err(&["--kernel", "/k", "--irqchip", "split", "--irqchip", "split"]),
        "option --irqchip given more than once"
    );
}

#[test]
fn viommu_remaps_interrupts_with_x2apic_by_default_on_the_split_irqchip() {
    let c = run(&["--kernel", "/k", "--viommu"]);
    let v = c.viommu.unwrap();
    assert!(v.intremap && v.eim);
    assert_eq!(
        c.irqchip,
        Irqchip::Split,
        "the IOAPIC must be ours to remap"
    );
    let c = run(&["--kernel", "/k", "--viommu", "intremap=off"]);
    let v = c.viommu.unwrap();
    assert!(!v.intremap && !v.eim, "eim follows intremap");
    assert_eq!(c.irqchip, Irqchip::Kernel);
    let c = run(&["--kernel", "/k", "--viommu", "eim=off"]);
    let v = c.viommu.unwrap();
    assert!(v.intremap && !v.eim && v.ioapic_sid_check);
    let c = run(&["--kernel", "/k", "--viommu", "ioapic-sid-check=off"]);
    assert!(c.viommu.is_some_and(|v| v.intremap && !v.ioapic_sid_check));
    let c = run(&[
        "--kernel",
        "/k",
        "--viommu",
        "intremap=off",
        "--irqchip",
        "split",
    ]);
    assert_eq!(c.irqchip, Irqchip::Split);
    let c = run(&[
        "--kernel",
        "/k",
        "--viommu",
        "intremap=off",
        "--irqchip",
        "kernel",
    ]);
    assert_eq!(c.irqchip, Irqchip::Kernel);
}

#[test]
fn bad_interrupt_remapping_options_say_why_in_one_line() {
    assert_eq!(
        err(&["--kernel", "/k", "--viommu", "--irqchip", "kernel"]),
        "--irqchip: invalid mode 'kernel': an in-kernel IOAPIC's interrupts would bypass \
         the VT-d's interrupt remapping (use --irqchip split, or --viommu intremap=off)"
    );
    assert_eq!(
        err(&["--kernel", "/k", "--viommu", "intremap=off,eim=on"]),
        "--viommu: invalid eim 'on': extended interrupt mode (x2APIC destinations) needs \
         intremap=on"
    );
    assert_eq!(
        err(&["--kernel", "/k", "--viommu", "intremap=yes"]),
        "--viommu: invalid intremap 'yes': must be on or off"
    );
    assert_eq!(
        err(&["--kernel", "/k", "--viommu", "eim=1"]),
        "--viommu: invalid eim '1': must be on or off"
    );
}

#[test]
fn more_than_255_vcpus_need_x2apic_remapping() {
    assert_eq!(run(&["--kernel", "/k", "--cpus", "boot=255"]).vcpus, 255);
    let c = run(&["--kernel", "/k", "--cpus", "boot=288", "--viommu"]);
    assert_eq!(c.vcpus, 288);
    let why = "more than 255 vCPUs need APIC IDs above 254, which Linux uses only in x2APIC \
               mode with interrupt remapping (add --viommu intremap=on,eim=on)";
    assert_eq!(
        err(&["--kernel", "/k", "--cpus", "boot=256"]),
        format!("--cpus: invalid boot '256': {why}")
    );
    assert_eq!(
        err(&["--kernel", "/k", "--cpus", "boot=300", "--viommu", "eim=off"]),
        format!("--cpus: invalid boot '300': {why}")
    );
    assert!(err(&["--kernel", "/k", "--cpus", "boot=-1"]).contains("whole number"));
}

#[test]
fn edu_is_a_flag_given_at_most_once() {
    assert!(!run(&["--kernel", "/k"]).edu);
    let c = run(&["--kernel", "/k", "--edu", "--viommu", "--cpus", "boot=4"]);
    assert!(c.edu && c.viommu.is_some() && c.vcpus == 4);
    assert!(run(&["--edu", "--kernel", "/k"]).edu);
    assert_eq!(
        err(&["--kernel", "/k", "--edu", "--edu"]),
        "option --edu given more than once"
    );
    assert_eq!(
        err(&["--kernel", "/k", "--edu=on"]),
        "option --edu takes no value (got 'on')"
    );
}

#[test]
fn devices_behind_the_viommu_say_iommu_on_and_need_it() {
    let c = run(&["--kernel", "/k", "--viommu", "--device", "path=/d,iommu=on"]);
    assert!(c.devices[0].iommu);
    assert_eq!(
        err(&["--kernel", "/k", "--device", "path=/d,iommu=on"]),
        "--device: invalid iommu 'on for /d': iommu=on needs --viommu"
    );
    assert_eq!(
        err(&["--kernel", "/k", "--viommu", "--device", "path=/d"]),
        "--device: invalid iommu 'off for /d': with --viommu every device must be behind \
         it (add iommu=on)"
    );
    assert!(err(&["--kernel", "/k", "--device", "path=/d,iommu=yes"]).contains("on or off"));
}

#[test]
fn backend_is_iommufd_or_container_per_device_and_mixes() {
    let c = run(&[
        "--kernel",
        "/k",
        "--viommu",
        "--device",
        "path=/a,iommu=on,backend=iommufd",
        "--device",
        "backend=container,path=/b,iommu=on",
        "--device",
        "path=/c,iommu=on",
    ]);
    let backends: Vec<Option<Backend>> = c.devices.iter().map(|d| d.backend).collect();
    assert_eq!(
        backends,
        [Some(Backend::Iommufd), Some(Backend::Container), None]
    );
    assert!(c.devices.iter().all(|d| d.iommu));
    assert_eq!(
        err(&["--kernel", "/k", "--device", "path=/d,backend=vfio"]),
        "--device: invalid backend 'vfio': must be iommufd or container"
    );
    assert_eq!(
        err(&["--kernel", "/k", "--device", "path=/d,backend="]),
        "--device: invalid backend '': must be iommufd or container"
    );
}

/// The command line `--kernel /k` with a `--device` for each of `specs`.
fn with_devices<'a>(specs: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--kernel", "/k"];
    for spec in specs {
        args.extend(["--device", spec]);
    }
    args
}

/// The slot and function each device asks for, `None` where it asks for none.
fn addrs(c: &VmConfig) -> Vec<Option<(u8, u8)>> {
    c.devices
        .iter()
        .map(|d| d.addr.map(|a| (a.slot(), a.function())))
        .collect()
}

#[test]
fn devices_go_at_the_slot_and_function_addr_asks_for_in_qemus_spelling() {
    let c = run(&with_devices(&[
        "path=/a,addr=05.1",
        "path=/b,addr=5",
        "path=/c",
        "path=/d,addr=1f.0",
    ]));
    assert_eq!(
        addrs(&c),
        [Some((5, 1)), Some((5, 0)), None, Some((0x1f, 0))]
    );
}

#[test]
fn a_malformed_or_out_of_range_addr_is_refused_naming_it() {
    let bad = |addr: &str| err(&with_devices(&[&format!("path=/d,addr={addr}")]));
    assert_eq!(
        bad("5:1"),
        "--device: invalid addr '5:1': expected SLOT[.FUNCTION] in hex, e.g. 05.1"
    );
    assert_eq!(
        bad(""),
        "--device: invalid addr '': expected SLOT[.FUNCTION] in hex, e.g. 05.1"
    );
    assert_eq!(
        bad("20.0"),
        "--device: invalid addr '20.0': slot 0x20 is past the last, 0x1f"
    );
    assert_eq!(
        bad("5.8"),
        "--device: invalid addr '5.8': function 8 is past the last, 7"
    );
    assert_eq!(
        bad("0.0"),
        "--device: invalid addr '0.0': slot 0 is the host bridge's"
    );
    assert_eq!(
        bad("00.3"),
        "--device: invalid addr '00.3': slot 0 is the host bridge's"
    );
}

#[test]
fn two_devices_at_one_address_are_refused_naming_both() {
    assert_eq!(
        err(&with_devices(&["path=/a,addr=5.0", "path=/b,addr=05.0"])),
        "--device: invalid addr '05.0 for /b': /a asks for it too"
    );
}

#[test]
fn a_slot_with_functions_but_no_function_0_is_refused() {
    assert_eq!(
        err(&with_devices(&[
            "path=/a,addr=5.0",
            "path=/b,addr=6.1",
            "path=/c,addr=6.2"
        ])),
        "--device: invalid addr '06.1 for /b': slot 06 has no function 0 (a guest looks for \
         functions 1-7 only when function 0 says multi-function; add a device at addr=06.0)"
    );
    // Function 0 listed after the others is fine: the bus takes it first.
    let c = run(&with_devices(&["path=/b,addr=6.1", "path=/a,addr=6.0"]));
    assert_eq!(addrs(&c), [Some((6, 1)), Some((6, 0))]);
}
