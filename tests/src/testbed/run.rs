//! Building the testbed and the vmm, and running one scenario: overlay, L0 QEMU, console
//! streaming, markers, timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use super::console::{Line, LineSplitter, Marker};
use super::error::TestbedError;
use super::outcome::{tail, Outcome, TAIL_LINES};
use super::scenario::{L1Kernel, Scenario};

/// The built testbed: where its scripts and cached images are.
#[derive(Debug)]
pub struct Testbed {
    repo: PathBuf,
    out: PathBuf,
    vmm: OnceLock<Result<PathBuf, String>>,
    shared: Mutex<BTreeMap<String, Arc<SharedRun>>>,
    /// The scratch disks made in this process (see [`Testbed::fresh_scratch_disk`]).
    scratch: Mutex<BTreeSet<String>>,
}

/// One run shared by the tests that ask for it; the error is kept as its message.
type SharedRun = OnceLock<Result<Arc<Outcome>, String>>;

static TESTBED: OnceLock<Result<Testbed, String>> = OnceLock::new();

/// The guard every testbed test starts with: the testbed, or `None` after a loud message saying
/// why it cannot run here. With `CI=true` it panics instead: CI must never pass by skipping.
pub fn require() -> Option<&'static Testbed> {
    match Testbed::get() {
        Ok(tb) => Some(tb),
        Err(e) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{e}\n(CI=true: testbed tests fail instead of skipping)");
            }
            // Straight to stderr: the test runner's capture would hide an eprintln! of a
            // passing (skipped) test.
            let _ = writeln!(
                std::io::stderr(),
                "\n!!! SKIPPED testbed test: {e}\n!!! (run `bash resources/testbed/install-deps.sh` \
                 as root; with CI=true this is a failure)\n"
            );
            None
        }
    }
}

fn run_cmd(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(TAIL_LINES);
        Err(format!(
            "{what} failed ({}):\n{}",
            out.status,
            lines[start..].join("\n")
        ))
    }
}

fn timeout_scale() -> f64 {
    std::env::var("TB_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0)
}

impl Testbed {
    /// The testbed, built (once per process) if its cache is missing or stale. If packages are
    /// missing it runs `install-deps.sh` (which works as root) and tries again.
    pub fn get() -> Result<&'static Testbed, TestbedError> {
        TESTBED
            .get_or_init(Self::build)
            .as_ref()
            .map_err(|e| TestbedError::Unavailable(e.clone()))
    }

    fn build() -> Result<Testbed, String> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .ok_or("the tests crate has no parent directory")?
            .to_path_buf();
        let out = std::env::var_os("TB_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join("target/testbed"));
        let tb = Testbed {
            repo,
            out,
            vmm: OnceLock::new(),
            shared: Mutex::new(BTreeMap::new()),
            scratch: Mutex::new(BTreeSet::new()),
        };
        fs::create_dir_all(&tb.out).map_err(|e| format!("creating {}: {e}", tb.out.display()))?;
        let _lock = tb.lock().map_err(|e| e.to_string())?;
        let build = || run_cmd(&mut tb.script_cmd("build.sh"), "resources/testbed/build.sh");
        if let Err(first) = build() {
            log::warn!("testbed build failed, installing packages: {first}");
            run_cmd(
                &mut tb.script_cmd("install-deps.sh"),
                "resources/testbed/install-deps.sh",
            )
            .map_err(|e| format!("{first}\nand then {e}"))?;
            build()?;
        }
        Ok(tb)
    }

    fn script_cmd(&self, script: &str) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(self.repo.join("resources/testbed").join(script))
            .env("TB_OUT", &self.out)
            .current_dir(&self.repo)
            .stdin(Stdio::null());
        cmd
    }

    /// `target/testbed` (or `$TB_OUT`): images, logs, runs.
    pub fn out_dir(&self) -> &Path {
        &self.out
    }

    /// The workspace root.
    pub fn repo_dir(&self) -> &Path {
        &self.repo
    }

    /// The md5 of the disk image L0 attaches as NVMe (what L2 should read from it).
    pub fn disk_md5(&self) -> Result<String, TestbedError> {
        let path = self.out.join("disk.img.md5");
        fs::read_to_string(&path)
            .map(|s| s.trim().to_string())
            .map_err(|e| TestbedError::io(format!("reading {}", path.display()), e))
    }

    /// The md5 of the first `bytes` bytes of the disk image L0 attaches as NVMe: what a guest
    /// reading that much of the passed-through disk must see.
    pub fn disk_head_md5(&self, bytes: u64) -> Result<String, TestbedError> {
        let img = self.out.join("disk.img");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "head -c {bytes} '{}' | md5sum | cut -d' ' -f1",
                img.display()
            ))
            .output()
            .map_err(|e| TestbedError::io(format!("md5sum of {}", img.display()), e))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A zeroed 4 MiB disk image `name` under the testbed's output folder, for
    /// [`crate::testbed::Scenario::scratch_nvme`]: created afresh by the first call in this
    /// process, so that the tests sharing one run ([`Testbed::run_shared`]) all see what that run
    /// wrote rather than a later test zeroing it again.
    pub fn fresh_scratch_disk(&self, name: &str) -> Result<PathBuf, TestbedError> {
        let path = self.out.join(name);
        let mut made = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if made.insert(name.to_string()) {
            fs::write(&path, vec![0u8; 4 << 20])
                .map_err(|e| TestbedError::io(format!("creating {}", path.display()), e))?;
        }
        Ok(path)
    }

    /// Our vmm binary: `$TB_VMM` if set, else built once per process by [`Testbed::cargo_release`].
    pub fn vmm_binary(&self) -> Result<PathBuf, TestbedError> {
        self.vmm
            .get_or_init(|| {
                if let Some(path) = std::env::var_os("TB_VMM") {
                    return Ok(PathBuf::from(path));
                }
                self.cargo_release(&["-p", "vmm", "--bin", "vmm"], "vmm")
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(TestbedError::VmmBuild)
    }

    /// Runs `cargo build --release ARGS` for a binary to put into L1 and returns
    /// `<target>/release/<artifact>` (e.g. `examples/vfio_probe`). The target dir is
    /// `target/testbed/cargo`: a cargo inside a running `cargo test` would wait forever on the
    /// build lock of `target/` that the outer one holds.
    pub fn cargo_release(&self, args: &[&str], artifact: &str) -> Result<PathBuf, TestbedError> {
        let target = self.out.join("cargo");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        run_cmd(
            Command::new(cargo)
                .args(["build", "--release"])
                .args(args)
                .arg("--target-dir")
                .arg(&target)
                .current_dir(&self.repo)
                .stdin(Stdio::null()),
            &format!("cargo build --release {}", args.join(" ")),
        )
        .map_err(TestbedError::VmmBuild)?;
        Ok(target.join("release").join(artifact))
    }

    /// One of the testbed's run slots, held for a run: `TB_SLOTS` runs at once across threads
    /// and processes (default: one per core, at most 2). An L0 QEMU keeps about one core busy
    /// (its TCG vCPU), so on this project's 2-core machine two runs side by side took
    /// `testbed_boot` from 425 s to 246 s, all passing. Slot 0 is `run.lock`, the lock the
    /// benchmarks take to keep tests off the machine.
    fn slot(&self) -> Result<File, TestbedError> {
        let slots = std::env::var("TB_SLOTS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get().min(2)));
        let mut files = Vec::with_capacity(slots);
        for i in 0..slots {
            let path = match i {
                0 => self.out.join("run.lock"),
                i => self.out.join(format!("run.lock.{i}")),
            };
            let file = File::create(&path)
                .map_err(|e| TestbedError::io(format!("creating {}", path.display()), e))?;
            files.push((path, file));
        }
        loop {
            for (path, file) in &files {
                match file.try_lock() {
                    Ok(()) => {
                        return file.try_clone().map_err(|e| {
                            TestbedError::io(format!("locking {}", path.display()), e)
                        })
                    }
                    Err(std::fs::TryLockError::WouldBlock) => {}
                    Err(std::fs::TryLockError::Error(e)) => {
                        return Err(TestbedError::io(format!("locking {}", path.display()), e))
                    }
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Serializes builds across threads and processes.
    fn lock(&self) -> Result<File, TestbedError> {
        let path = self.out.join("run.lock");
        let file = File::create(&path)
            .map_err(|e| TestbedError::io(format!("creating {}", path.display()), e))?;
        file.lock()
            .map_err(|e| TestbedError::io(format!("locking {}", path.display()), e))?;
        Ok(file)
    }

    /// Runs `scenario` once per process and shares the outcome: tests that check different facts
    /// of the same run (e.g. "reaches init" and "exits 0 on power-off") cost one run.
    pub fn run_shared(&self, scenario: &Scenario) -> Result<Arc<Outcome>, TestbedError> {
        let cell = {
            let mut map = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(scenario.name.clone()).or_default().clone()
        };
        cell.get_or_init(|| self.run(scenario).map(Arc::new).map_err(|e| e.to_string()))
            .clone()
            .map_err(TestbedError::Shared)
    }

    /// Runs `scenario`: builds what it needs, boots L1 and waits for it to power off. `Ok` means
    /// L1 ran the scenario to its end (`@@TB L1 scenario-exit`); what happened inside is for the
    /// caller to check on the [`Outcome`]. Timeouts and runs that never finish are errors.
    pub fn run(&self, scenario: &Scenario) -> Result<Outcome, TestbedError> {
        match self.run_once(scenario) {
            Err(TestbedError::Frozen { what, log, .. }) => {
                // Keep the frozen run's log, and say so loudly (straight to stderr: the test
                // runner's capture would swallow eprintln! in a test that then passes), since a
                // freeze that keeps coming back must get looked at.
                let kept = log.with_extension("frozen.log");
                let _ = fs::rename(&log, &kept);
                let _ = writeln!(
                    std::io::stderr(),
                    "testbed: `{}` froze ({what}; log {}): running it once more",
                    scenario.name,
                    kept.display()
                );
                self.run_once(scenario)
            }
            other => other,
        }
    }

    fn run_once(&self, scenario: &Scenario) -> Result<Outcome, TestbedError> {
        let vmm = if scenario.with_vmm {
            Some(self.vmm_binary()?)
        } else {
            None
        };
        let _slot = self.slot()?;
        // The cache may have been rebuilt by another process since: cheap when up to date.
        run_cmd(
            &mut self.script_cmd("build.sh"),
            "resources/testbed/build.sh",
        )
        .map_err(TestbedError::Unavailable)?;
        // The L1 kernel's base initramfs, and the kernel itself (None: l0-qemu.sh's default).
        let (base, kernel) = match scenario.l1_kernel {
            L1Kernel::Distro => (self.out.join("l1-base.cpio"), None),
            L1Kernel::Iommufd => {
                run_cmd(
                    &mut self.script_cmd("build-l1-iommufd.sh"),
                    "resources/testbed/build-l1-iommufd.sh",
                )
                .map_err(TestbedError::Unavailable)?;
                let dir = self.out.join("l1-iommufd");
                (dir.join("l1-base.cpio"), Some(dir.join("vmlinuz")))
            }
        };

        let run_dir = self.out.join("runs").join(&scenario.name);
        let logs = self.out.join("logs");
        for dir in [&run_dir, &logs] {
            fs::create_dir_all(dir)
                .map_err(|e| TestbedError::io(format!("creating {}", dir.display()), e))?;
        }
        let script = run_dir.join("scenario.sh");
        fs::write(&script, scenario.l1_script_text())
            .map_err(|e| TestbedError::io(format!("writing {}", script.display()), e))?;
        let initrd = run_dir.join("initrd");
        let mut mk = self.script_cmd("mkinitrd.sh");
        mk.arg("--out")
            .arg(&initrd)
            .arg("--base")
            .arg(&base)
            .arg("--script")
            .arg(&script);
        if let Some(vmm) = &vmm {
            mk.arg("--vmm").arg(vmm);
        }
        for (host, dest) in &scenario.files {
            mk.arg("--add").arg(format!("{}={dest}", host.display()));
        }
        run_cmd(&mut mk, "resources/testbed/mkinitrd.sh").map_err(TestbedError::Unavailable)?;

        let log = logs.join(format!("{}.log", scenario.name));
        let heartbeat = run_dir.join("l1-heartbeat");
        let _ = fs::remove_file(&heartbeat);
        let mut l0 = self.script_cmd("l0-qemu.sh");
        l0.env("TB_L1_HEARTBEAT", &heartbeat);
        if let Some(kernel) = &kernel {
            l0.arg("--kernel").arg(kernel);
        }
        l0.arg("--initrd")
            .arg(&initrd)
            .args(["--smp", &scenario.l1_smp.to_string()])
            .args(["--mem", &scenario.l1_mem_mib.to_string()])
            .arg("--")
            .args(&scenario.l0_args);
        let limits = Limits {
            total: scenario.timeout.mul_f64(timeout_scale()),
            silence: scenario.silence_timeout.mul_f64(timeout_scale()),
        };
        log::info!(
            "testbed: running `{}` (log {})",
            scenario.name,
            log.display()
        );
        stream(scenario, &mut l0, &log, &heartbeat, limits)
    }
}

/// L1 writes its heartbeat every 5 s; this long without one means L1 is not running.
const HEARTBEAT_STALE: Duration = Duration::from_secs(20);

/// How long ago L1 last wrote its heartbeat file, or None if it never did.
fn heartbeat_age(heartbeat: &Path) -> Option<Duration> {
    let meta = fs::metadata(heartbeat).ok().filter(|m| m.len() > 0)?;
    let written = meta.modified().ok()?;
    Some(
        SystemTime::now()
            .duration_since(written)
            .unwrap_or_default(),
    )
}

/// When a run is given up.
#[derive(Clone, Copy)]
struct Limits {
    total: Duration,
    silence: Duration,
}

/// Kills L0 QEMU if the run is abandoned (timeout, or a panic in the harness).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn reader(
    mut src: impl Read + Send + 'static,
    prefix: &'static str,
    start: Instant,
    tx: mpsc::Sender<Line>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut splitter = LineSplitter::default();
        let mut buf = [0u8; 4096];
        let send = |text: String| {
            let _ = tx.send(Line {
                at: start.elapsed(),
                text: format!("{prefix}{text}"),
            });
        };
        while let Ok(n) = src.read(&mut buf) {
            if n == 0 {
                break;
            }
            splitter.push(&buf[..n]).into_iter().for_each(send);
        }
        if let Some(last) = splitter.finish() {
            send(last);
        }
    })
}

/// Spawns L0 QEMU, streams its console to `log` (and stderr with TB_VERBOSE=1) until it exits or
/// a limit passes, and collects lines and markers.
fn stream(
    scenario: &Scenario,
    cmd: &mut Command,
    log: &Path,
    heartbeat: &Path,
    limits: Limits,
) -> Result<Outcome, TestbedError> {
    let verbose = std::env::var("TB_VERBOSE").is_ok_and(|v| v != "0" && !v.is_empty());
    let mut file = BufWriter::new(
        File::create(log)
            .map_err(|e| TestbedError::io(format!("creating {}", log.display()), e))?,
    );
    let start = Instant::now();
    let mut child = KillOnDrop(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| TestbedError::io("spawning L0 QEMU (l0-qemu.sh)", e))?,
    );
    let (tx, rx) = mpsc::channel();
    let mut readers = Vec::new();
    if let Some(out) = child.0.stdout.take() {
        readers.push(reader(out, "", start, tx.clone()));
    }
    if let Some(err) = child.0.stderr.take() {
        readers.push(reader(err, "[L0 stderr] ", start, tx.clone()));
    }
    drop(tx);

    let mut lines = Vec::new();
    let mut markers = Vec::new();
    let mut timed_out = None;
    let mut l1_stalled: Option<String> = None;
    loop {
        let last_output = lines.last().map_or(Duration::ZERO, |l: &Line| l.at);
        let now = start.elapsed();
        let left_total = limits.total.saturating_sub(now);
        let left_silence = (last_output + limits.silence).saturating_sub(now);
        match rx.recv_timeout(left_total.min(left_silence)) {
            Ok(line) => {
                // The log is best effort: a full disk must not hide the run's result.
                let _ = writeln!(file, "{}", line.text).and_then(|_| file.flush());
                if verbose {
                    let _ = writeln!(std::io::stderr(), "{}", line.text);
                }
                if let Some(m) = Marker::parse(&line.text, line.at) {
                    log::debug!("{:?} {}", m.at, m.raw);
                    markers.push(m);
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = Some(if left_total <= left_silence {
                    format!("timed out after {:.0}s", limits.total.as_secs_f64())
                } else {
                    format!("no console output for {:.0}s", limits.silence.as_secs_f64())
                });
                // Before L0 is killed: is L1 itself still running?
                l1_stalled = match heartbeat_age(heartbeat) {
                    Some(age) if age < HEARTBEAT_STALE => None,
                    Some(age) => Some(format!(
                        "L1's heartbeat stopped {:.0}s ago",
                        age.as_secs_f64()
                    )),
                    None => Some("L1 never wrote a heartbeat".to_string()),
                };
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    drop(child); // kills QEMU if it is still running
    for r in readers {
        let _ = r.join();
    }
    let elapsed = start.elapsed();
    // Host-side times of the markers (from L0 start), for timing reports.
    for m in &markers {
        let _ = writeln!(file, "@@HARNESS +{:.2}s {}", m.at.as_secs_f64(), m.raw);
    }
    let _ = writeln!(
        file,
        "@@HARNESS elapsed={:.1}s gave_up={}",
        elapsed.as_secs_f64(),
        timed_out.as_deref().unwrap_or("no")
    );

    let fail = |what: String| TestbedError::Run {
        scenario: scenario.name.clone(),
        what,
        log: log.to_path_buf(),
        tail: tail(&lines, TAIL_LINES),
    };
    if let Some(why) = timed_out {
        let last = markers.last().map_or("none".to_string(), |m| m.raw.clone());
        let what = format!("{why} (killed L0 QEMU); last marker: {last}");
        if let Some(stalled) = l1_stalled {
            return Err(TestbedError::Frozen {
                scenario: scenario.name.clone(),
                what: format!("{what}; {stalled}"),
                log: log.to_path_buf(),
                tail: tail(&lines, TAIL_LINES),
            });
        }
        return Err(fail(what));
    }
    let exit = markers
        .iter()
        .find(|m| m.source == "L1" && m.name == "scenario-exit")
        .and_then(|m| m.field_num::<i32>("scenario-exit"));
    let Some(scenario_exit) = exit else {
        return Err(fail(
            "L0 QEMU exited before L1 finished the scenario (no `@@TB L1 scenario-exit`)".into(),
        ));
    };
    Ok(Outcome {
        scenario: scenario.name.clone(),
        log: log.to_path_buf(),
        lines,
        markers,
        elapsed,
        scenario_exit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_age_is_none_until_l1_writes_and_small_after() {
        let dir = std::env::temp_dir().join(format!("tb-heartbeat-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let hb = dir.join("l1-heartbeat");
        let _ = fs::remove_file(&hb);
        assert!(heartbeat_age(&hb).is_none(), "no file");
        fs::write(&hb, "").unwrap();
        assert!(heartbeat_age(&hb).is_none(), "nothing written yet");
        fs::write(&hb, "12.5\n").unwrap();
        assert!(heartbeat_age(&hb).is_some_and(|a| a < HEARTBEAT_STALE));
        fs::remove_dir_all(&dir).unwrap();
    }
}
