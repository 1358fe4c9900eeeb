//! What one testbed run does: the L1 machine, and the script L1 runs (usually: boot the L2 Linux
//! under a VMM).

use std::path::PathBuf;
use std::time::Duration;

/// The VMM that runs the L2 guest inside L1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Vmm {
    /// This workspace's `vmm` binary.
    Ours,
    /// Debian's QEMU with KVM, as a reference (validates the testbed independently of our vmm).
    Qemu,
}

/// The kernel L1 runs (the L2 kernel is always the testbed's default, Debian's 6.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum L1Kernel {
    /// Debian bookworm's 6.1, the kernel `build.sh` takes from the host's packages: VFIO's
    /// container interface only (no iommufd).
    #[default]
    Distro,
    /// Debian bookworm-backports' 6.12 with iommufd and VFIO device files
    /// (`build-l1-iommufd.sh`): `/dev/iommu` and `/dev/vfio/devices/vfioN` beside the container.
    Iommufd,
}

/// The L2 kernel command line every L2 boot starts from. `quiet` because each console byte is a
/// nested exit: the full boot log costs about 5 s per boot. Set `TB_L2_CMDLINE_EXTRA=loglevel=8`
/// to see it when debugging.
pub const L2_BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// An L2 Linux boot: the VMM, its vCPUs and memory, and what the L2 init should do.
#[derive(Clone, Debug)]
pub struct L2Boot {
    pub vmm: L2Vmm,
    pub cpus: u32,
    pub memory_mib: u32,
    /// `tb.action=` of the L2 init (`poweroff`, `reboot`, `panic`, `info`, ...).
    pub action: String,
    /// Extra L2 kernel command-line words (e.g. `tb.modules=nvme`).
    pub cmdline_extra: Vec<String>,
    /// Extra arguments for the VMM (shell words, not quoted further).
    pub vmm_args: Vec<String>,
    /// A command prefix for the VMM, e.g. `strace -c -f`.
    pub wrap: Option<String>,
}

/// What L1 runs after it is ready.
#[derive(Clone, Debug)]
pub enum Body {
    /// Boot the L2 Linux once and print `@@TB VMM exit=RC`.
    L2Boot(L2Boot),
    /// A custom L1 shell script (busybox sh); the vmm binary is at `/testbed/bin/vmm` when the
    /// scenario asked for it.
    Script(String),
}

/// One testbed run. Build with [`Scenario::l2_boot`] or [`Scenario::l1_script`], adjust with the
/// builder methods, then run it with [`crate::testbed::Testbed::run`] or
/// [`crate::testbed::Testbed::run_shared`].
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Names the log (`target/testbed/logs/<name>.log`) and the run directory; unique per test.
    pub name: String,
    pub body: Body,
    /// Whether the overlay carries our vmm binary.
    pub with_vmm: bool,
    /// The kernel L1 boots.
    pub l1_kernel: L1Kernel,
    /// L1's vCPUs and memory (L0 QEMU `-smp`, `-m`).
    pub l1_smp: u32,
    pub l1_mem_mib: u32,
    /// Host files copied into L1: (host path, path inside L1).
    pub files: Vec<(PathBuf, String)>,
    /// Extra L0 QEMU arguments (e.g. `-trace vtd_inv_desc* -D file`).
    pub l0_args: Vec<String>,
    /// The run is killed and fails after this long.
    pub timeout: Duration,
    /// ... or after this long without any console output (a hung guest fails fast; a quiet L2
    /// boot prints nothing for about 10-15 s).
    pub silence_timeout: Duration,
}

impl Scenario {
    /// Boots the L2 Linux under `vmm` with 1 vCPU, 512 MiB and `tb.action=poweroff`.
    pub fn l2_boot(name: &str, vmm: L2Vmm) -> Self {
        let mut s = Self::base(
            name,
            Body::L2Boot(L2Boot {
                vmm,
                cpus: 1,
                memory_mib: 512,
                action: "poweroff".into(),
                cmdline_extra: Vec::new(),
                vmm_args: Vec::new(),
                wrap: None,
            }),
        );
        s.with_vmm = vmm == L2Vmm::Ours;
        s
    }

    /// Runs `script` in L1 (busybox sh, cwd /tmp); add [`Scenario::with_vmm`] if it needs the vmm.
    pub fn l1_script(name: &str, script: &str) -> Self {
        Self::base(name, Body::Script(script.to_string()))
    }

    fn base(name: &str, body: Body) -> Self {
        Scenario {
            name: name.to_string(),
            body,
            with_vmm: false,
            l1_kernel: L1Kernel::Distro,
            l1_smp: 1,
            l1_mem_mib: 2048,
            files: Vec::new(),
            l0_args: Vec::new(),
            timeout: Duration::from_secs(240),
            silence_timeout: Duration::from_secs(90),
        }
    }

    fn l2_mut(&mut self) -> &mut L2Boot {
        match &mut self.body {
            Body::L2Boot(b) => b,
            Body::Script(_) => panic!(
                "scenario `{}`: L2 options need Scenario::l2_boot",
                self.name
            ),
        }
    }

    /// L2 vCPUs (`--cpus boot=N`).
    pub fn cpus(mut self, n: u32) -> Self {
        self.l2_mut().cpus = n;
        self
    }

    /// L2 memory in MiB (`--memory size=NM`).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.l2_mut().memory_mib = mib;
        self
    }

    /// The L2 init action (`tb.action=`).
    pub fn action(mut self, action: &str) -> Self {
        self.l2_mut().action = action.to_string();
        self
    }

    /// One more L2 kernel command-line word.
    pub fn l2_cmdline_arg(mut self, arg: &str) -> Self {
        self.l2_mut().cmdline_extra.push(arg.to_string());
        self
    }

    /// One more argument for the L2 VMM.
    pub fn vmm_arg(mut self, arg: &str) -> Self {
        self.l2_mut().vmm_args.push(arg.to_string());
        self
    }

    /// Runs the L2 VMM under a command prefix such as `strace -c -f`.
    pub fn vmm_wrap(mut self, prefix: &str) -> Self {
        self.l2_mut().wrap = Some(prefix.to_string());
        self
    }

    /// Puts our vmm binary into L1 at `/testbed/bin/vmm` (in PATH).
    pub fn with_vmm(mut self) -> Self {
        self.with_vmm = true;
        self
    }

    /// Boots L1 on `kernel` instead of the testbed's default.
    pub fn l1_kernel(mut self, kernel: L1Kernel) -> Self {
        self.l1_kernel = kernel;
        self
    }

    pub fn l1_smp(mut self, n: u32) -> Self {
        self.l1_smp = n;
        self
    }

    pub fn l1_mem_mib(mut self, mib: u32) -> Self {
        self.l1_mem_mib = mib;
        self
    }

    /// Copies a host file into L1 at `dest`.
    pub fn file(mut self, host: impl Into<PathBuf>, dest: &str) -> Self {
        self.files.push((host.into(), dest.to_string()));
        self
    }

    pub fn l0_arg(mut self, arg: &str) -> Self {
        self.l0_args.push(arg.to_string());
        self
    }

    /// Attaches the raw image at `path` to L0 as one more NVMe controller with serial `serial`,
    /// writable (no snapshot), so what a guest writes can be read back from the file.
    pub fn scratch_nvme(self, path: &std::path::Path, serial: &str) -> Self {
        let id = format!("scratch-{serial}");
        self.l0_arg("-drive")
            .l0_arg(&format!(
                "file={},if=none,id={id},format=raw",
                path.display()
            ))
            .l0_arg("-device")
            .l0_arg(&format!("nvme,drive={id},serial={serial}"))
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn silence_timeout(mut self, timeout: Duration) -> Self {
        self.silence_timeout = timeout;
        self
    }

    /// The full L2 kernel command line of an L2 boot.
    pub fn l2_cmdline(&self) -> Option<String> {
        let Body::L2Boot(b) = &self.body else {
            return None;
        };
        let mut words = vec![L2_BASE_CMDLINE.to_string()];
        words.extend(b.cmdline_extra.iter().cloned());
        if let Ok(extra) = std::env::var("TB_L2_CMDLINE_EXTRA") {
            words.push(extra);
        }
        words.push(format!("tb.action={}", b.action));
        Some(words.join(" "))
    }

    /// The script L1 runs.
    pub fn l1_script_text(&self) -> String {
        let b = match &self.body {
            Body::Script(s) => return s.clone(),
            Body::L2Boot(b) => b,
        };
        let cmdline = shell_quote(&self.l2_cmdline().unwrap_or_default());
        let mut cmd = match b.vmm {
            L2Vmm::Ours => format!(
                "vmm --kernel /testbed/vmlinuz --initramfs /testbed/l2.cpio.gz --cmdline {cmdline} \
                 --cpus boot={} --memory size={}M",
                b.cpus, b.memory_mib
            ),
            // -action panic=exit-failure: QEMU exits 1 when pvpanic reports a guest panic, the
            // behaviour our vmm has too.
            L2Vmm::Qemu => format!(
                "qemu-system-x86_64 -enable-kvm -cpu host -smp {} -m {}M -nodefaults -display none \
                 -serial stdio -no-reboot -device pvpanic -action panic=exit-failure \
                 -kernel /testbed/vmlinuz -initrd /testbed/l2.cpio.gz -append {cmdline}",
                b.cpus, b.memory_mib
            ),
        };
        for arg in &b.vmm_args {
            cmd.push(' ');
            cmd.push_str(arg);
        }
        if let Some(wrap) = &b.wrap {
            cmd = format!("{wrap} {cmd}");
        }
        // stderr goes through a fifo and tee: shown live on the console, and its last line
        // (the VMM's one-line reason for a non-zero exit) reported as a marker afterwards.
        format!(
            "t0=$(cut -d' ' -f1 /proc/uptime)\n\
             echo \"@@TB VMM start vmm={:?}\"\n\
             mkfifo /tmp/vmm.errpipe\n\
             tee /tmp/vmm.stderr </tmp/vmm.errpipe >&2 &\n\
             tee_pid=$!\n\
             {cmd} 2>/tmp/vmm.errpipe\n\
             rc=$?\n\
             wait $tee_pid\n\
             [ -s /tmp/vmm.stderr ] && echo \"@@TB VMM stderr-last: $(tail -n 1 /tmp/vmm.stderr)\"\n\
             echo \"@@TB VMM exit=$rc secs=$(awk -v t0=$t0 '{{printf \"%.2f\", $1 - t0}}' /proc/uptime)\"\n",
            b.vmm
        )
    }
}

/// Quotes `s` as one POSIX shell word.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_single_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn l2_boot_script_runs_our_vmm_with_the_fixed_cli_forms() {
        let s = Scenario::l2_boot("x", L2Vmm::Ours)
            .cpus(2)
            .memory_mib(384)
            .action("panic");
        let script = s.l1_script_text();
        assert!(
            script.contains("--cpus boot=2 --memory size=384M"),
            "{script}"
        );
        assert!(script.contains("tb.action=panic'"), "{script}");
        assert!(script.contains("@@TB VMM exit=$rc"), "{script}");
        assert!(s.with_vmm);
    }

    #[test]
    fn qemu_reference_does_not_need_our_vmm() {
        let s = Scenario::l2_boot("x", L2Vmm::Qemu);
        assert!(!s.with_vmm);
        assert!(s
            .l1_script_text()
            .contains("qemu-system-x86_64 -enable-kvm"));
    }
}
