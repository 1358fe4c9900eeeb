//! kvm-unit-tests on our vmm, directly on this machine's KVM: the suite built from the tarball
//! kept in `resources/kvm-unit-tests/` (or `$KUT_TARBALL`) into `target/kvm-unit-tests`, the vmm binary built for the tests (or
//! `$KUT_VMM`), and a test run as the suite's `x86/run` runs it under QEMU: the `.flat` as the
//! kernel, `-smp` as `--cpus`, `-append` as `--cmdline`, the environment file as the initramfs.
//!
//! Without /dev/kvm, the tarball, or gcc/make, the tests skip loudly; with CI=true they fail.
//!
//! The runner of the whole suite builds on it: [`cfg`] reads `x86/unittests.cfg`, [`params`]
//! maps a test's QEMU options to ours, [`runner`] runs a test under our vmm or under QEMU and
//! judges it as the suite's `run_tests.sh` does, [`pass_list`] is the list of tests QEMU passes
//! here that ours must pass, and [`table`] prints the results (the `kvm-unit-tests` binary,
//! which `resources/kvm-unit-tests.sh` runs).

pub mod cfg;
pub mod params;
pub mod pass_list;
pub mod runner;
pub mod table;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Returns `None` after saying loudly why the tests cannot run; panics instead under CI=true.
pub fn skip_unless<T>(what: Result<T, String>) -> Option<T> {
    match what {
        Ok(v) => Some(v),
        Err(e) => {
            let msg = format!("kvm-unit-tests cannot run here: {e}");
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{msg} (CI=true: failing instead of skipping)");
            }
            eprintln!("SKIPPED: {msg}");
            None
        }
    }
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = err.lines().rev().take(20).collect();
    Err(format!(
        "{what} failed ({}):\n{}",
        out.status,
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    ))
}

/// The vmm binary: `$KUT_VMM`, else built once per process (debug) into its own target dir,
/// since a cargo inside `cargo test` would wait forever on the outer one's lock of `target/`.
pub fn vmm_binary() -> Result<&'static Path, String> {
    static VMM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    VMM.get_or_init(|| {
        if let Some(path) = std::env::var_os("KUT_VMM") {
            return Ok(PathBuf::from(path));
        }
        let target = workspace().join("target").join("kut-vmm");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        run_checked(
            Command::new(cargo)
                .args(["build", "-p", "vmm", "--bin", "vmm", "--target-dir"])
                .arg(&target)
                .current_dir(workspace()),
            "cargo build -p vmm --bin vmm",
        )?;
        Ok(target.join("debug").join("vmm"))
    })
    .as_deref()
    .map_err(Clone::clone)
}

fn find_tarball() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KUT_TARBALL") {
        return Ok(PathBuf::from(p));
    }
    let dir = workspace().join("resources").join("kvm-unit-tests");
    let mut tarballs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("kvm-unit-tests-") && n.ends_with(".tar.gz"))
        })
        .collect();
    tarballs.sort();
    tarballs.pop().ok_or_else(|| {
        format!(
            "no kvm-unit-tests-*.tar.gz in {} (set KUT_TARBALL)",
            dir.display()
        )
    })
}

/// The built suite: `target/kvm-unit-tests` with its `x86/*.flat`. Built once, then reused
/// while the stamp names the same tarball.
pub fn suite() -> Result<&'static Path, String> {
    static SUITE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    SUITE
        .get_or_init(|| {
            let tarball = find_tarball()?;
            let target = workspace().join("target");
            let dir = target.join("kvm-unit-tests");
            let stamp = dir.join(".built-from");
            let want = tarball.display().to_string();
            if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
                return Ok(dir);
            }
            std::fs::create_dir_all(&target)
                .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
            run_checked(
                Command::new("tar")
                    .arg("xzf")
                    .arg(&tarball)
                    .arg("-C")
                    .arg(&target),
                &format!("tar xzf {}", tarball.display()),
            )?;
            run_checked(
                Command::new("./configure").current_dir(&dir),
                "kvm-unit-tests ./configure",
            )?;
            run_checked(
                Command::new("make").arg("-j2").current_dir(&dir),
                "kvm-unit-tests make",
            )?;
            std::fs::write(&stamp, &want)
                .map_err(|e| format!("cannot write {}: {e}", stamp.display()))?;
            Ok(dir)
        })
        .as_deref()
        .map_err(Clone::clone)
}

/// What one run of the vmm gave.
#[derive(Debug)]
pub struct Run {
    /// The exit status (`None` when killed at the timeout).
    pub status: Option<ExitStatus>,
    /// The guest's serial output, then the vmm's stderr.
    pub output: String,
    /// The process's stdout alone (the guest's serial output, for the vmm).
    pub stdout: String,
    /// The process's stderr alone.
    pub stderr: String,
    /// How long it ran.
    pub duration: Duration,
}

impl Run {
    /// The process exit code, if it exited.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Lines starting with `prefix` ("PASS: ", "FAIL: ").
    pub fn lines_starting(&self, prefix: &str) -> Vec<&str> {
        self.output
            .lines()
            .filter(|l| l.trim_start_matches('\r').starts_with(prefix))
            .collect()
    }
}

/// QEMU's default RAM, which the suite's `x86/run` keeps unless a test asks for more.
pub const DEFAULT_MEMORY_MIB: u64 = 128;

/// How a test is run.
#[derive(Clone, Debug, Default)]
pub struct Options<'a> {
    /// vCPUs (unittests.cfg `smp`, default 1).
    pub cpus: u8,
    /// The test's arguments (unittests.cfg `test_args`).
    pub args: &'a str,
    /// An environment file (the runner's `-initrd`).
    pub env: Option<&'a Path>,
    /// `--irqchip` (`kernel`, the default, or `split`).
    pub irqchip: Option<&'a str>,
    /// Guest RAM in MiB ([`DEFAULT_MEMORY_MIB`] when `None`).
    pub memory_mib: Option<u64>,
    /// `--viommu`'s options, when the test wants a VT-d.
    pub viommu: Option<&'a str>,
    /// `--edu`.
    pub edu: bool,
}

impl Options<'_> {
    /// The vmm's arguments after `--kernel`.
    pub fn vmm_args(&self) -> Vec<String> {
        let memory = self.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        let mut args = vec![
            "--cpus".to_string(),
            format!("boot={}", self.cpus.max(1)),
            "--memory".to_string(),
            format!("size={memory}M"),
        ];
        if !self.args.is_empty() {
            args.extend(["--cmdline".to_string(), self.args.to_string()]);
        }
        if let Some(env) = self.env {
            args.extend(["--initramfs".to_string(), env.display().to_string()]);
        }
        if let Some(irqchip) = self.irqchip {
            args.extend(["--irqchip".to_string(), irqchip.to_string()]);
        }
        if let Some(viommu) = self.viommu {
            // `--viommu=` keeps an empty option list one argument.
            args.push(format!("--viommu={viommu}"));
        }
        if self.edu {
            args.push("--edu".to_string());
        }
        args
    }
}

/// Runs the vmm on `kernel` with `opts`, killing it after `timeout`.
pub fn run_vmm(kernel: &Path, opts: &Options, timeout: Duration) -> Result<Run, String> {
    let vmm = vmm_binary()?;
    let mut cmd = Command::new(vmm);
    cmd.arg("--kernel").arg(kernel).args(opts.vmm_args());
    run_process(cmd, timeout).map_err(|e| format!("{}: {e}", vmm.display()))
}

/// Runs `cmd` in a process group of its own with its output captured, killing the group after
/// `timeout` (a runner script's QEMU goes with it).
pub fn run_process(mut cmd: Command, timeout: Duration) -> Result<Run, String> {
    use std::os::unix::process::CommandExt;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let out_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b);
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        b
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() >= timeout => {
                kill_group(child.id());
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
    };
    let duration = start.elapsed();
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    Ok(Run {
        status,
        output: format!("{stdout}{stderr}"),
        stdout,
        stderr,
        duration,
    })
}

/// Kills the process group `pgid` (a child spawned with `process_group(0)`: its id).
fn kill_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals the process group of our own child, which
    // `process_group(0)` made; it touches no memory of ours.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Runs `x86/<flat>` of the built suite.
pub fn run_test(flat: &str, opts: &Options, timeout: Duration) -> Result<Run, String> {
    let kernel = suite()?.join("x86").join(flat);
    run_vmm(&kernel, opts, timeout)
}
