//! `--viommu`: the virtual VT-d's options.

use std::path::PathBuf;

use viommu::cache::CacheConfig;
use viommu::inject::{self, Injection};

use super::{parse_size, ConfigError, InvalidReason, OptionList};

/// `--viommu [aw-bits=39|48][,flush=strict|deferred][,queue=sync|async]
/// [,scalable-mode=on|off][,first-stage=on|off][,intremap=on|off][,eim=on|off]
/// [,ioapic-sid-check=on|off][,record=PATH[,record-limit=SIZE]][,caching-mode=on|off]
/// [,caches=on|off]
/// [,iotlb-entries=N][,context-entries=N][,pasid-entries=N][,iec-entries=N]
/// [,device-iotlb=on|off][,check=on|off][,check-report=PATH][,inject=SPEC[+SPEC...]]
/// [,inject-control=PATH]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViommuConfig {
    /// Guest address width: 39 (3-level tables) or 48 (3- and 4-level), as `aw-bits=` gave it;
    /// None: the widest every passed-through device's host IOMMU can map (48, else 39; see
    /// [`crate::device_manager::address_width`]).
    pub aw_bits: Option<u32>,
    /// Deferred host unmaps (Linux's flush-queue bounds) instead of strict ones.
    pub deferred: bool,
    /// Queue tail writes taken by KVM (ioeventfds) and carried out on the event loop instead
    /// of in the writing vCPU's exit.
    pub async_queue: bool,
    /// Scalable mode offered (PASID tables, second-stage and pass-through PASID entries).
    pub scalable_mode: bool,
    /// First-stage translation offered too; only without passed-through devices.
    pub first_stage: bool,
    /// Interrupt remapping (ECAP.IR): every interrupt source behind the unit (passed-through
    /// MSI/MSI-X, the IOAPIC, emulated devices) is remapped through the guest's table. Needs
    /// the split irqchip.
    pub intremap: bool,
    /// Extended interrupt mode (ECAP.EIM): x2APIC destinations, so a guest can have more than
    /// 255 vCPUs. Needs `intremap`.
    pub eim: bool,
    /// The IOAPIC's interrupt requests are source-validated against its IRTE (VT-d 9.10), as
    /// the spec says; off skips that for the IOAPIC, as QEMU's VT-d does, for guest code
    /// written against QEMU.
    pub ioapic_sid_check: bool,
    /// Where to record the guest's traffic to the unit, for `vmm replay`.
    pub record: Option<PathBuf>,
    /// The most bytes the recording may take.
    pub record_limit: u64,
    /// Caching mode (CAP.CM): the guest invalidates on every change, which passed-through
    /// devices need. Off, the guest driver takes the path it takes on hardware; only emulated
    /// devices can then be behind the unit.
    pub caching_mode: bool,
    /// The translation caches of emulated devices' requests.
    pub caches: CacheConfig,
    /// Device-TLBs (ECAP.DT): emulated ATS devices may cache translations.
    pub device_iotlb: bool,
    /// The protocol checker.
    pub check: bool,
    /// Where the checker's JSON report goes when the VM stops.
    pub check_report: Option<PathBuf>,
    /// Faults to inject, counted from the start.
    pub inject: Vec<Injection>,
    /// A file whose injections are armed (counted from then) each time it changes.
    pub inject_control: Option<PathBuf>,
}

/// The size cap of a recording when `record-limit=` is not given.
pub const DEFAULT_RECORD_LIMIT: u64 = 256 << 20;

/// The smallest size cap a recording may have: its header and a boot's first events.
const MIN_RECORD_LIMIT: u64 = 1 << 20;

impl Default for ViommuConfig {
    /// What `--viommu` alone gives: a complete VT-d, DMA and interrupt remapping with x2APIC,
    /// as every VT-d since the first x2APIC machines (and QEMU's `intremap=on`, whose eim
    /// follows intremap with KVM).
    fn default() -> Self {
        ViommuConfig {
            aw_bits: None,
            deferred: false,
            async_queue: false,
            scalable_mode: false,
            first_stage: false,
            intremap: true,
            eim: true,
            ioapic_sid_check: true,
            record: None,
            record_limit: DEFAULT_RECORD_LIMIT,
            caching_mode: true,
            caches: CacheConfig::HARDWARE,
            device_iotlb: false,
            check: false,
            check_report: None,
            inject: Vec::new(),
            inject_control: None,
        }
    }
}

/// The keys `--viommu` takes.
const KEYS: &[&str] = &[
    "aw-bits",
    "flush",
    "queue",
    "scalable-mode",
    "first-stage",
    "intremap",
    "eim",
    "ioapic-sid-check",
    "record",
    "record-limit",
    "caching-mode",
    "caches",
    "iotlb-entries",
    "context-entries",
    "pasid-entries",
    "iec-entries",
    "device-iotlb",
    "check",
    "check-report",
    "inject",
    "inject-control",
];

/// Most entries a cache option takes.
const MAX_CACHE_ENTRIES: u64 = 1 << 16;

pub(super) fn parse_viommu(input: &str) -> Result<ViommuConfig, ConfigError> {
    let mut c = ViommuConfig::default();
    if input.is_empty() {
        return Ok(c);
    }
    let list = OptionList::parse("--viommu", input, KEYS)?;
    if let Some(raw) = list.get("aw-bits") {
        c.aw_bits = match raw {
            "39" => Some(39),
            "48" => Some(48),
            _ => return Err(list.invalid("aw-bits", raw, InvalidReason::NotOneOf("39 or 48"))),
        };
    }
    if let Some(raw) = list.get("flush") {
        c.deferred = match raw {
            "strict" => false,
            "deferred" => true,
            _ => {
                let reason = InvalidReason::NotOneOf("strict or deferred");
                return Err(list.invalid("flush", raw, reason));
            }
        };
    }
    if let Some(raw) = list.get("queue") {
        c.async_queue = match raw {
            "sync" => false,
            "async" => true,
            _ => return Err(list.invalid("queue", raw, InvalidReason::NotOneOf("sync or async"))),
        };
    }
    let on_off = |key: &'static str, default: bool| match list.get(key) {
        None => Ok(default),
        Some("off") => Ok(false),
        Some("on") => Ok(true),
        Some(raw) => Err(list.invalid(key, raw, InvalidReason::NotOneOf("on or off"))),
    };
    c.scalable_mode = on_off("scalable-mode", false)?;
    c.first_stage = on_off("first-stage", false)?;
    if c.first_stage && !c.scalable_mode {
        return Err(list.invalid(
            "first-stage",
            "on",
            InvalidReason::FirstStageNeedsScalableMode,
        ));
    }
    if c.first_stage && c.aw_bits.is_some_and(|w| w != 48) {
        return Err(list.invalid("first-stage", "on", InvalidReason::FirstStageNeeds48Bits));
    }
    c.intremap = on_off("intremap", c.intremap)?;
    // Extended interrupt mode follows interrupt remapping unless asked for.
    c.eim = on_off("eim", c.intremap)?;
    if c.eim && !c.intremap {
        return Err(list.invalid("eim", "on", InvalidReason::EimNeedsIntremap));
    }
    c.ioapic_sid_check = on_off("ioapic-sid-check", true)?;
    if let Some(raw) = list.get("record") {
        if raw.is_empty() {
            return Err(list.invalid("record", raw, InvalidReason::Empty));
        }
        c.record = Some(PathBuf::from(raw));
    }
    if let Some(raw) = list.get("record-limit") {
        if c.record.is_none() {
            return Err(list.invalid("record-limit", raw, InvalidReason::LimitWithoutRecord));
        }
        let limit = parse_size(raw).map_err(|e| list.invalid("record-limit", raw, e))?;
        if limit < MIN_RECORD_LIMIT {
            let reason = InvalidReason::TooSmall {
                min_mib: MIN_RECORD_LIMIT >> 20,
            };
            return Err(list.invalid("record-limit", raw, reason));
        }
        c.record_limit = limit;
    }
    c.caching_mode = on_off("caching-mode", true)?;
    if !on_off("caches", true)? {
        c.caches = CacheConfig::OFF;
    }
    let entries = |key: &'static str, default: usize| -> Result<usize, ConfigError> {
        let Some(raw) = list.get(key) else {
            return Ok(default);
        };
        let n: u64 = raw
            .parse()
            .map_err(|_| list.invalid(key, raw, InvalidReason::NotAWholeNumber))?;
        if n > MAX_CACHE_ENTRIES {
            let range = InvalidReason::OutOfRange {
                min: 0,
                max: MAX_CACHE_ENTRIES,
            };
            return Err(list.invalid(key, raw, range));
        }
        Ok(n as usize)
    };
    c.caches = CacheConfig {
        iotlb: entries("iotlb-entries", c.caches.iotlb)?,
        context: entries("context-entries", c.caches.context)?,
        pasid: entries("pasid-entries", c.caches.pasid)?,
        iec: entries("iec-entries", c.caches.iec)?,
    };
    c.device_iotlb = on_off("device-iotlb", false)?;
    c.check = on_off("check", false)?;
    if let Some(raw) = list.get("check-report") {
        if raw.is_empty() {
            return Err(list.invalid("check-report", raw, InvalidReason::Empty));
        }
        if !c.check {
            return Err(list.invalid("check-report", raw, InvalidReason::CheckReportNeedsCheck));
        }
        c.check_report = Some(PathBuf::from(raw));
    }
    if let Some(raw) = list.get("inject") {
        c.inject = inject::parse_list(raw).map_err(|e| list.invalid("inject", raw, e))?;
    }
    if let Some(raw) = list.get("inject-control") {
        if raw.is_empty() {
            return Err(list.invalid("inject-control", raw, InvalidReason::Empty));
        }
        c.inject_control = Some(PathBuf::from(raw));
    }
    let driver_options =
        !c.inject.is_empty() || c.inject_control.is_some() || c.caches != CacheConfig::HARDWARE;
    if let (Some(path), true) = (&c.record, driver_options) {
        let path = path.display().to_string();
        return Err(list.invalid("record", &path, InvalidReason::RecordWithDriverOptions));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{err, run};

    #[test]
    fn viommu_alone_takes_the_defaults_and_options_override_them() {
        let c = run(&["--kernel", "/k", "--viommu", "--cpus", "boot=1"]);
        assert_eq!(c.viommu, Some(ViommuConfig::default()));
        let c = run(&["--kernel", "/k", "--viommu"]);
        assert_eq!(c.viommu, Some(ViommuConfig::default()));
        let c = run(&["--kernel", "/k", "--viommu", "aw-bits=39,flush=deferred"]);
        assert_eq!(
            c.viommu,
            Some(ViommuConfig {
                aw_bits: Some(39),
                deferred: true,
                async_queue: false,
                ..ViommuConfig::default()
            })
        );
        let c = run(&["--kernel", "/k", "--viommu", "queue=async"]);
        assert!(c.viommu.is_some_and(|v| v.async_queue && !v.deferred));
        let c = run(&[
            "--kernel",
            "/k",
            "--viommu=flush=strict",
            "--stats-json",
            "/s",
        ]);
        assert_eq!(c.viommu, Some(ViommuConfig::default()));
        assert_eq!(c.stats_json, Some(PathBuf::from("/s")));
        assert_eq!(run(&["--kernel", "/k"]).viommu, None);
    }

    #[test]
    fn aw_bits_given_is_remembered_and_absent_is_left_to_the_hosts() {
        let width = |args: &[&str]| run(args).viommu.expect("a VT-d").aw_bits;
        assert_eq!(width(&["--kernel", "/k", "--viommu"]), None);
        assert_eq!(
            width(&["--kernel", "/k", "--viommu", "flush=deferred"]),
            None
        );
        assert_eq!(
            width(&["--kernel", "/k", "--viommu", "aw-bits=48"]),
            Some(48)
        );
        assert_eq!(
            width(&["--kernel", "/k", "--viommu", "aw-bits=39"]),
            Some(39)
        );
        // First-stage takes the default (48 without devices behind) or an explicit 48.
        let stage1 = "scalable-mode=on,first-stage=on";
        assert_eq!(width(&["--kernel", "/k", "--viommu", stage1]), None);
        let explicit = format!("{stage1},aw-bits=48");
        assert_eq!(width(&["--kernel", "/k", "--viommu", &explicit]), Some(48));
        assert_eq!(
            err(&["--kernel", "/k", "--viommu", "aw-bits="]),
            "--viommu: invalid aw-bits '': must be 39 or 48"
        );
    }

    #[test]
    fn a_recording_is_refused_with_injections_or_other_caches_in_one_line() {
        for extra in [
            "inject=iqe",
            "inject-control=/c",
            "caches=off",
            "iotlb-entries=8",
        ] {
            let e = err(&["--kernel", "/k", "--viommu", &format!("record=/r,{extra}")]);
            assert!(
                e.starts_with("--viommu: invalid record '/r': a recording replays"),
                "{e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
        let c = run(&["--kernel", "/k", "--viommu", "record=/r,check=on"]);
        assert!(c.viommu.is_some_and(|v| v.check && v.record.is_some()));
    }

    #[test]
    fn bad_viommu_options_name_the_key_and_value() {
        assert_eq!(
            err(&["--kernel", "/k", "--viommu", "aw-bits=40"]),
            "--viommu: invalid aw-bits '40': must be 39 or 48"
        );
        assert_eq!(
            err(&["--kernel", "/k", "--viommu", "flush=lazy"]),
            "--viommu: invalid flush 'lazy': must be strict or deferred"
        );
        assert_eq!(
            err(&["--kernel", "/k", "--viommu", "queue=fast"]),
            "--viommu: invalid queue 'fast': must be sync or async"
        );
        assert!(err(&["--kernel", "/k", "--viommu", "caching=off"]).contains("unknown key"));
        assert_eq!(
            err(&["--kernel", "/k", "--stats-json"]),
            "option --stats-json needs a value"
        );
    }

    #[test]
    fn scalable_mode_and_first_stage_are_on_off_options() {
        let c = run(&["--kernel", "/k", "--viommu", "scalable-mode=on"]);
        assert!(c.viommu.is_some_and(|v| v.scalable_mode && !v.first_stage));
        let c = run(&[
            "--kernel",
            "/k",
            "--viommu",
            "scalable-mode=on,first-stage=on",
        ]);
        assert!(c.viommu.is_some_and(|v| v.scalable_mode && v.first_stage));
        let c = run(&["--kernel", "/k", "--viommu", "scalable-mode=off"]);
        assert_eq!(c.viommu, Some(ViommuConfig::default()));
        assert_eq!(
            err(&["--kernel", "/k", "--viommu", "scalable-mode=yes"]),
            "--viommu: invalid scalable-mode 'yes': must be on or off"
        );
        assert_eq!(
            err(&["--kernel", "/k", "--viommu", "first-stage=on"]),
            "--viommu: invalid first-stage 'on': first-stage=on needs scalable-mode=on"
        );
        assert!(err(&[
            "--kernel",
            "/k",
            "--viommu",
            "aw-bits=39,scalable-mode=on,first-stage=on"
        ])
        .contains("needs aw-bits=48"));
    }

    #[test]
    fn first_stage_is_refused_in_one_line_with_a_passed_through_device() {
        let e = err(&[
            "--kernel",
            "/k",
            "--viommu",
            "scalable-mode=on,first-stage=on",
            "--device",
            "path=/d,iommu=on",
        ]);
        assert!(
            e.starts_with("--viommu: invalid first-stage 'on with --device /d':"),
            "{e}"
        );
        assert!(e.contains("sends no invalidation"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        // Scalable mode alone takes them.
        run(&[
            "--kernel",
            "/k",
            "--viommu",
            "scalable-mode=on",
            "--device",
            "path=/d,iommu=on",
        ]);
    }

    #[test]
    fn caching_mode_caches_checker_and_device_tlbs_are_options() {
        let c = run(&[
            "--kernel",
            "/k",
            "--viommu",
            "caching-mode=off,check=on,check-report=/r.json,device-iotlb=on,iotlb-entries=16",
        ]);
        let v = c.viommu.expect("a VT-d");
        assert!(!v.caching_mode && v.check && v.device_iotlb);
        assert_eq!(v.check_report, Some(PathBuf::from("/r.json")));
        assert_eq!(
            v.caches,
            CacheConfig {
                iotlb: 16,
                ..CacheConfig::HARDWARE
            }
        );
        let c = run(&["--kernel", "/k", "--viommu", "caches=off,iec-entries=4"]);
        assert_eq!(
            c.viommu.map(|v| v.caches),
            Some(CacheConfig {
                iec: 4,
                ..CacheConfig::OFF
            }),
            "sizes given after caches=off turn single caches back on"
        );
        assert_eq!(
            err(&["--kernel", "/k", "--viommu", "iotlb-entries=70000"]),
            "--viommu: invalid iotlb-entries '70000': must be 0..=65536"
        );
        assert_eq!(
            err(&["--kernel", "/k", "--viommu", "check-report=/r"]),
            "--viommu: invalid check-report '/r': check-report needs check=on"
        );
        assert_eq!(
            err(&["--kernel", "/k", "--viommu", "caching-mode=maybe"]),
            "--viommu: invalid caching-mode 'maybe': must be on or off"
        );
    }

    #[test]
    fn injections_are_joined_with_plus_and_bad_ones_named() {
        let c = run(&[
            "--kernel",
            "/k",
            "--viommu",
            "inject=iqe@3+dma-fault,inject-control=/ctl",
        ]);
        let v = c.viommu.expect("a VT-d");
        let names: Vec<String> = v.inject.iter().map(|i| i.to_string()).collect();
        assert_eq!(names, ["iqe@3", "dma-fault@1"]);
        assert_eq!(v.inject_control, Some(PathBuf::from("/ctl")));
        assert_eq!(
            err(&["--kernel", "/k", "--viommu", "inject=boom"]),
            "--viommu: invalid inject 'boom': unknown injection 'boom' (known: iqe, ite, ice, \
             dma-fault, records-full)"
        );
    }

    #[test]
    fn caching_mode_off_is_refused_in_one_line_with_a_passed_through_device() {
        let e = err(&[
            "--kernel",
            "/k",
            "--viommu",
            "caching-mode=off",
            "--device",
            "path=/d,iommu=on",
        ]);
        assert!(
            e.starts_with("--viommu: invalid caching-mode 'off with --device /d':"),
            "{e}"
        );
        assert!(e.contains("invalidates on every change"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
}
