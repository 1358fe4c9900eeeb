//! A test's QEMU options (`smp`, `qemu_params`/`extra_params` of `x86/unittests.cfg`) as our
//! vmm's. What has no counterpart is listed, so a result can be read knowing it; the test
//! still runs.
//!
//! | QEMU | ours |
//! | --- | --- |
//! | `-smp N` | `--cpus boot=N` |
//! | `-m SIZE` | `--memory size=SIZE` (MiB when no unit, as QEMU) |
//! | `-M`/`-machine q35,kernel-irqchip=split` | `--irqchip split` (`=on`: kernel; the machine type is ours either way) |
//! | `-device intel-iommu,intremap=on,eim=off[,aw-bits=N]` | `--viommu intremap=on,eim=off,aw-bits=39,ioapic-sid-check=off` (QEMU 7.2's default width is 39 bits; caching mode is always on in ours; QEMU's IOAPIC requests skip IRTE source validation, and `intel_iommu` relies on it: its IOAPIC IRTE names the edu's requester ID) |
//! | `-device edu` | `--edu` |
//! | `-cpu MODEL,+feat` | nothing: our vCPUs have every feature KVM offers (as `-cpu host`) |
//! | `-enable-kvm` | nothing: always KVM |
//!
//! Not mapped: removing CPUID features (`-cpu ...,-x2apic`), CPUID vendor and physical-address
//! bits, Hyper-V enlightenments, `-machine pit=off` and `vmport=on`, `-overcommit`, `-global`,
//! other devices.

use super::cfg::CfgTest;
use super::{Options, DEFAULT_MEMORY_MIB};

/// The options of one test as ours takes them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmmOptions {
    pub cpus: u8,
    /// The test's arguments, expanded as the shell expands them for QEMU's `-append`.
    pub args: String,
    pub memory_mib: u64,
    pub irqchip: Option<&'static str>,
    pub viommu: Option<String>,
    pub edu: bool,
    /// The QEMU options that have no counterpart in ours.
    pub unmapped: Vec<String>,
}

impl VmmOptions {
    /// As the harness's [`Options`].
    pub fn as_options(&self) -> Options<'_> {
        Options {
            cpus: self.cpus,
            args: &self.args,
            env: None,
            irqchip: self.irqchip,
            memory_mib: Some(self.memory_mib),
            viommu: self.viommu.as_deref(),
            edu: self.edu,
        }
    }
}

/// Why a test's options cannot be given to ours at all.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("smp = {0} is not a vCPU count")]
    Smp(String),
    #[error("{option} needs a value")]
    MissingValue { option: String },
    #[error("-m {0}: not a size")]
    Memory(String),
}

/// Maps `test` (its arguments `args` already expanded) to our options.
pub fn map(test: &CfgTest, args: String) -> Result<VmmOptions, MapError> {
    let cpus = test
        .cpus()
        .ok_or_else(|| MapError::Smp(test.smp.clone().unwrap_or_default()))?;
    let mut o = VmmOptions {
        cpus,
        args,
        memory_mib: DEFAULT_MEMORY_MIB,
        ..VmmOptions::default()
    };
    let params = test.qemu_params.as_deref().unwrap_or("");
    let mut words = params.split_whitespace();
    while let Some(option) = words.next() {
        let mut value = || {
            words.next().ok_or_else(|| MapError::MissingValue {
                option: option.to_string(),
            })
        };
        match option {
            "-smp" => {
                let v = value()?;
                o.cpus = v
                    .split(',')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| MapError::Smp(v.to_string()))?;
            }
            "-m" => {
                let v = value()?;
                o.memory_mib = memory_mib(v).ok_or_else(|| MapError::Memory(v.to_string()))?;
            }
            "-M" | "-machine" => machine(&mut o, option, value()?),
            "-device" => device(&mut o, value()?),
            "-cpu" => cpu(&mut o, value()?),
            "-enable-kvm" => {}
            "-overcommit" | "-global" => {
                let v = value()?;
                o.unmapped.push(format!("{option} {v}"));
            }
            _ => o.unmapped.push(option.to_string()),
        }
    }
    Ok(o)
}

/// QEMU's `-m`: MiB without a unit, else K/M/G/T.
fn memory_mib(v: &str) -> Option<u64> {
    let v = v.strip_prefix("size=").unwrap_or(v);
    let (digits, shift_from_mib) = match v.chars().last()? {
        'k' | 'K' => (&v[..v.len() - 1], -10),
        'm' | 'M' => (&v[..v.len() - 1], 0),
        'g' | 'G' => (&v[..v.len() - 1], 10),
        't' | 'T' => (&v[..v.len() - 1], 20),
        _ => (v, 0),
    };
    let n: u64 = digits.parse().ok()?;
    match shift_from_mib {
        s if s < 0 => Some(n >> -s),
        s => n.checked_mul(1 << s),
    }
}

fn machine(o: &mut VmmOptions, option: &str, value: &str) {
    for (i, item) in value.split(',').enumerate() {
        match item.split_once('=') {
            Some(("kernel-irqchip", "split")) => o.irqchip = Some("split"),
            Some(("kernel-irqchip", "on")) => o.irqchip = Some("kernel"),
            // The machine type (q35, pc): ours has one.
            None if i == 0 => {}
            _ => o.unmapped.push(format!("{option} {item}")),
        }
    }
}

fn device(o: &mut VmmOptions, value: &str) {
    let mut items = value.split(',');
    match items.next() {
        Some("edu") => {
            o.edu = true;
            o.unmapped.extend(items.map(|p| format!("-device edu,{p}")));
        }
        Some("intel-iommu") => {
            let mut ours = Vec::new();
            let mut aw_bits = "39";
            for prop in items {
                match prop.split_once('=') {
                    Some(("intremap", v)) => ours.push(format!("intremap={v}")),
                    Some(("eim", v)) => ours.push(format!("eim={v}")),
                    Some(("aw-bits", v)) => aw_bits = v,
                    // Ours always has caching mode, which a VMM remapping host DMA needs.
                    Some(("caching-mode", "on")) => {}
                    _ => o.unmapped.push(format!("-device intel-iommu,{prop}")),
                }
            }
            ours.push(format!("aw-bits={aw_bits}"));
            // QEMU validates no IOAPIC request's source-id (they carry none there).
            ours.push("ioapic-sid-check=off".to_string());
            o.viommu = Some(ours.join(","));
        }
        _ => o.unmapped.push(format!("-device {value}")),
    }
}

/// The CPU model is ours (KVM's supported CPUID, as `-cpu host`), so adding features asks for
/// nothing more; removing them or changing the vendor or address width has no counterpart.
fn cpu(o: &mut VmmOptions, value: &str) {
    for prop in value.split(',').skip(1) {
        let adds = prop.starts_with('+')
            || prop.ends_with("=on")
            || matches!(prop, "host-phys-bits" | "migratable=no")
            || !(prop.starts_with('-') || prop.contains('='));
        if !adds || prop.starts_with("hv_") {
            o.unmapped.push(format!("-cpu {prop}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_params(params: &str) -> VmmOptions {
        let t = CfgTest {
            name: "t".into(),
            smp: Some("2".into()),
            qemu_params: Some(params.into()),
            ..CfgTest::default()
        };
        map(&t, String::new()).expect("maps")
    }

    #[test]
    fn intel_iommus_test_gets_the_split_irqchip_the_vtd_with_remapping_and_edu() {
        let o = with_params(
            "-M q35,kernel-irqchip=split -device intel-iommu,intremap=on,eim=off -device edu",
        );
        assert_eq!(o.irqchip, Some("split"));
        assert_eq!(
            o.viommu.as_deref(),
            Some("intremap=on,eim=off,aw-bits=39,ioapic-sid-check=off")
        );
        assert!(o.edu);
        assert!(o.unmapped.is_empty(), "{:?}", o.unmapped);
        assert_eq!(o.cpus, 2);
        assert_eq!(o.memory_mib, DEFAULT_MEMORY_MIB);
        let args = o.as_options().vmm_args();
        assert_eq!(
            args,
            [
                "--cpus",
                "boot=2",
                "--memory",
                "size=128M",
                "--irqchip",
                "split",
                "--viommu=intremap=on,eim=off,aw-bits=39,ioapic-sid-check=off",
                "--edu"
            ]
        );
    }

    #[test]
    fn memory_follows_qemus_units() {
        assert_eq!(with_params("-m 2048").memory_mib, 2048);
        assert_eq!(with_params("-cpu host -m 4g").memory_mib, 4096);
        assert_eq!(with_params("-m 2560").memory_mib, 2560);
        let t = CfgTest {
            qemu_params: Some("-m lots".into()),
            ..CfgTest::default()
        };
        assert_eq!(map(&t, String::new()), Err(MapError::Memory("lots".into())));
    }

    #[test]
    fn cpu_features_added_need_nothing_and_those_removed_are_listed() {
        assert!(with_params("-cpu qemu64,+x2apic,+tsc-deadline")
            .unmapped
            .is_empty());
        assert!(with_params("-cpu max,host-phys-bits").unmapped.is_empty());
        assert!(with_params("-enable-kvm -cpu host,migratable=no")
            .unmapped
            .is_empty());
        assert_eq!(
            with_params("-cpu qemu64,-x2apic,+tsc-deadline").unmapped,
            ["-cpu -x2apic"]
        );
        assert_eq!(
            with_params("-cpu Opteron_G1,vendor=AuthenticAMD").unmapped,
            ["-cpu vendor=AuthenticAMD"]
        );
        assert_eq!(
            with_params("-cpu host,hv_passthrough -device hyperv-testdev").unmapped,
            ["-cpu hv_passthrough", "-device hyperv-testdev"]
        );
    }

    #[test]
    fn machine_and_other_options_without_a_counterpart_are_listed() {
        assert_eq!(
            with_params("-machine pit=off").unmapped,
            ["-machine pit=off"]
        );
        assert_eq!(
            with_params("-cpu max,+svm -overcommit cpu-pm=on -m 4g").unmapped,
            ["-overcommit cpu-pm=on"]
        );
        assert_eq!(
            with_params("-M q35,kernel-irqchip=on").irqchip,
            Some("kernel")
        );
        assert_eq!(with_params("-smp 3").cpus, 3);
        let t = CfgTest {
            qemu_params: Some("-m".into()),
            ..CfgTest::default()
        };
        assert!(matches!(
            map(&t, String::new()),
            Err(MapError::MissingValue { .. })
        ));
    }
}
