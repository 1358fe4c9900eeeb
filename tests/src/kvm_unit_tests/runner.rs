//! Runs one test of `x86/unittests.cfg` under our vmm or under QEMU and judges it as the suite's
//! `run_tests.sh` does (`scripts/runtime.bash`, `scripts/vmm.bash`): exit status 1 (the test
//! wrote 0 to isa-debug-exit) with nothing but warnings on stderr passes, 77 skips, a timeout or
//! anything else fails; QEMU goes through the suite's own `x86/run`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::cfg::{self, CfgTest};
use super::pass_list::Entry;
use super::table::Row;
use super::{params, run_process, run_vmm, Run};

/// The verdict on one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Skip(String),
    Fail(String),
    Timeout(Duration),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Pass => write!(f, "PASS"),
            Verdict::Skip(why) if why.is_empty() => write!(f, "SKIP"),
            Verdict::Skip(why) => write!(f, "SKIP ({why})"),
            Verdict::Fail(why) if why.is_empty() => write!(f, "FAIL"),
            Verdict::Fail(why) => write!(f, "FAIL ({why})"),
            Verdict::Timeout(t) => write!(f, "FAIL (timeout; {}s)", t.as_secs()),
        }
    }
}

/// A test's `SUMMARY:` line (`lib/report.c`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub tests: u32,
    /// Unexpected, known and expected failures.
    pub failures: u32,
    pub skipped: u32,
}

impl Summary {
    pub fn passed(&self) -> u32 {
        self.tests.saturating_sub(self.failures + self.skipped)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.passed(), self.tests)
    }
}

/// The summary among the last five lines of `output`, as the suite's `extract_summary` finds it.
pub fn parse_summary(output: &str) -> Option<Summary> {
    let lines: Vec<&str> = output.lines().collect();
    let tail = &lines[lines.len().saturating_sub(5)..];
    let line = tail
        .iter()
        .rev()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("SUMMARY: "))?;
    let mut s = Summary::default();
    for part in line.split(", ") {
        let (n, what) = part.split_once(' ')?;
        let n: u32 = n.parse().ok()?;
        match what {
            "tests" => s.tests = n,
            "skipped" => s.skipped = n,
            w if w.ends_with("failures") => s.failures += n,
            _ => {}
        }
    }
    Some(s)
}

/// One run of a test.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub verdict: Verdict,
    pub summary: Option<Summary>,
    pub duration: Duration,
    /// What the run printed (serial output, then stderr).
    pub log: String,
}

impl Outcome {
    fn not_run(verdict: Verdict) -> Self {
        Self {
            verdict,
            summary: None,
            duration: Duration::ZERO,
            log: String::new(),
        }
    }
}

/// Whether an stderr line is a warning, which does not make a passing status a failure (the
/// suite greps for "warning"; our vmm's log lines say WARN).
fn is_warning(line: &str) -> bool {
    line.to_ascii_lowercase().contains("warn")
}

/// The suite's verdict on exit code `code` (None: killed at `timeout`) with `stderr`.
fn verdict_from_status(code: Option<i32>, stderr: &str, timeout: Duration) -> Verdict {
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !is_warning(l))
        .collect();
    match code {
        None | Some(124) => Verdict::Timeout(timeout),
        Some(1) if errors.is_empty() => Verdict::Pass,
        // The suite's `qemu_fixup_return_code`: leaving without isa-debug-exit is an error.
        Some(0) => Verdict::Fail("exited without writing to isa-debug-exit".into()),
        Some(77) => Verdict::Skip(String::new()),
        Some(c) if c > 128 => Verdict::Fail(format!("terminated on signal {}", c - 128)),
        Some(c) => Verdict::Fail(
            errors
                .first()
                .map_or_else(|| format!("status {c}"), |e| e.trim().to_string()),
        ),
    }
}

/// The built suite and its x86 tests.
pub struct Suite {
    pub dir: PathBuf,
    pub tests: Vec<CfgTest>,
}

impl Suite {
    /// The suite built in `dir` (see [`super::suite`]).
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join("x86").join("unittests.cfg");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tests: cfg::parse(&text),
        })
    }

    /// The test named `name`.
    pub fn test(&self, name: &str) -> Option<&CfgTest> {
        self.tests.iter().find(|t| t.name == name)
    }

    fn kernel(&self, test: &CfgTest) -> PathBuf {
        self.dir.join("x86").join(&test.file)
    }

    /// Why the suite's runner would not run `test` here (with `all`, `nodefault` tests run),
    /// checked as `scripts/runtime.bash` checks it.
    pub fn skip_reason(&self, test: &CfgTest, all: bool) -> Option<String> {
        if let Some(arch) = test.arch.as_deref().filter(|a| *a != "x86_64") {
            return Some(format!("{arch} only"));
        }
        if !all && test.in_group("nodefault") {
            return Some("test marked as manual run only".into());
        }
        if let Some(accel) = test.accel.as_deref().filter(|a| *a != "kvm") {
            return Some(format!("{accel} only"));
        }
        for (path, want) in &test.check {
            let have = std::fs::read_to_string(path).ok();
            if have.as_deref().map(str::trim_end) != Some(want.as_str()) {
                return Some(format!("{path} not equal to {want}"));
            }
        }
        if let Some(cond) = &test.disabled_if {
            let disabled = Command::new("bash")
                .args(["-c", cond])
                .status()
                .is_ok_and(|s| s.success());
            if disabled {
                return Some(format!("disabled because: {cond}"));
            }
        }
        if !self.kernel(test).exists() {
            return Some(format!("Test file '{}' not found", test.file));
        }
        None
    }

    /// Runs the test named `name` (under QEMU first when `qemu`; with `all`, also a test marked
    /// nodefault) into a table row, judged against its `list` entry if it has one and with its
    /// note from `notes`. A test on the list that cannot run here fails the list.
    pub fn run_row(
        &self,
        name: &str,
        qemu: bool,
        all: bool,
        list: &[Entry],
        notes: &BTreeMap<String, String>,
    ) -> Row {
        let entry = list.iter().find(|e| e.name == name);
        let mut row = Row {
            name: name.to_string(),
            note: notes.get(name).cloned(),
            ..Row::default()
        };
        let skipped = match self.test(name) {
            None => Err("not in x86/unittests.cfg".to_string()),
            Some(test) => self.skip_reason(test, all).map_or(Ok(test), Err),
        };
        let test = match skipped {
            Ok(test) => test,
            Err(why) => {
                row.judgement = entry.map(|_| Judgement::Failed(format!("not run here: {why}")));
                row.skipped = Some(why);
                return row;
            }
        };
        if qemu {
            row.qemu = Some(self.run_qemu(test));
        }
        let (ours, unmapped) = self.run_ours(test);
        row.judgement = entry.map(|e| judge(e, &ours));
        row.unmapped = unmapped;
        row.ours = Some(ours);
        row
    }

    /// How long `test` may run (`$TIMEOUT`, else its `timeout`, else 90 s).
    pub fn timeout(&self, test: &CfgTest) -> Duration {
        let env = std::env::var("TIMEOUT").ok();
        test.timeout(env.as_deref()).unwrap_or(cfg::DEFAULT_TIMEOUT)
    }

    /// Runs `test` under our vmm. Also returns the QEMU options that have no counterpart.
    pub fn run_ours(&self, test: &CfgTest) -> (Outcome, Vec<String>) {
        let timeout = self.timeout(test);
        let args = match test.test_args.as_deref().map(expand_args).transpose() {
            Ok(a) => a.unwrap_or_default(),
            Err(e) => return (Outcome::not_run(Verdict::Fail(e)), Vec::new()),
        };
        let opts = match params::map(test, args) {
            Ok(o) => o,
            Err(e) => return (Outcome::not_run(Verdict::Fail(e.to_string())), Vec::new()),
        };
        let outcome = match run_vmm(&self.kernel(test), &opts.as_options(), timeout) {
            Ok(run) => outcome(&run, verdict_from_status(run.code(), &run.stderr, timeout)),
            Err(e) => Outcome::not_run(Verdict::Fail(e)),
        };
        (outcome, opts.unmapped)
    }

    /// Runs `test` under QEMU with KVM through the suite's `x86/run`, as `run_tests.sh` would.
    pub fn run_qemu(&self, test: &CfgTest) -> Outcome {
        let timeout = self.timeout(test);
        let smp = test.smp.as_deref().unwrap_or("1");
        let append = test
            .test_args
            .as_deref()
            .map_or(String::new(), |a| format!("-append {a}"));
        let params = test.qemu_params.as_deref().unwrap_or("");
        // The suite's own command line (`get_cmdline`), evaluated by bash as it evaluates it.
        let cmdline = format!(
            "TESTNAME={} TIMEOUT={}s MACHINE= ACCEL=kvm ./x86/run x86/{} -smp {smp} {append} {params}",
            test.name,
            timeout.as_secs(),
            test.file
        );
        let mut cmd = Command::new("bash");
        cmd.args(["-c", &cmdline]).current_dir(&self.dir);
        // x86/run enforces the timeout (status 124); ours is the backstop.
        match run_process(cmd, timeout + Duration::from_secs(10)) {
            Ok(run) => outcome(&run, qemu_verdict(&run, timeout)),
            Err(e) => Outcome::not_run(Verdict::Fail(format!("bash x86/run: {e}"))),
        }
    }
}

fn outcome(run: &Run, verdict: Verdict) -> Outcome {
    Outcome {
        verdict,
        summary: parse_summary(&run.stdout),
        duration: run.duration,
        log: run.output.clone(),
    }
}

/// QEMU's verdict: `x86/run` has already turned the isa-debug-exit status into the suite's
/// (0: pass). Where QEMU fails before the test starts, the suite's runner (which tries QEMU
/// once without a kernel first) reports a skip with QEMU's last word, as here.
fn qemu_verdict(run: &Run, timeout: Duration) -> Verdict {
    // x86/run prints its command line first; anything after it is the guest's.
    let guest_output = run.stdout.lines().skip(1).any(|l| !l.trim().is_empty());
    let last_error = run.stderr.lines().rev().find(|l| !l.trim().is_empty());
    match run.code() {
        Some(0) => Verdict::Pass,
        Some(134) => Verdict::Skip("QEMU Aborted".into()),
        Some(c) if c != 124 && !guest_output && last_error.is_some() => {
            Verdict::Skip(last_error.unwrap_or_default().trim().to_string())
        }
        code => match verdict_from_status(code, &run.stderr, timeout) {
            // Status 1 after x86/run is QEMU's failure, not the test's pass.
            Verdict::Pass => Verdict::Fail("QEMU failed (status 1)".into()),
            v => v,
        },
    }
}

/// `test_args` as the shell expands them for `-append` (quotes, backticks): the words joined
/// by spaces.
pub fn expand_args(raw: &str) -> Result<String, String> {
    let out = Command::new("bash")
        .args(["-c", &format!("set -- {raw}; printf '%s' \"$*\"")])
        .output()
        .map_err(|e| format!("cannot run bash to expand test_args: {e}"))?;
    if !out.status.success() {
        return Err(format!("test_args `{raw}` do not expand"));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a run of a test on the list means for the list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// Passed as QEMU passes it.
    Passed,
    /// Failed as its `xfail` marker says it does.
    ExpectedFailure(String),
    /// Failed: the run fails.
    Failed(String),
    /// Passed though marked `xfail`: the run fails until the marker goes.
    UnexpectedPass,
}

impl Judgement {
    pub fn is_failure(&self) -> bool {
        matches!(self, Judgement::Failed(_) | Judgement::UnexpectedPass)
    }
}

impl fmt::Display for Judgement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Judgement::Passed => write!(f, "as QEMU"),
            Judgement::ExpectedFailure(why) => write!(f, "expected failure: {why}"),
            Judgement::Failed(why) => write!(f, "LIST FAILURE: {why}"),
            Judgement::UnexpectedPass => {
                write!(
                    f,
                    "LIST FAILURE: passes though marked xfail: remove the marker"
                )
            }
        }
    }
}

/// Judges our run of `entry`: a pass with as many subtests passed as QEMU passes.
pub fn judge(entry: &Entry, ours: &Outcome) -> Judgement {
    let passed = match (&ours.verdict, entry.subtests, ours.summary) {
        (Verdict::Pass, None, _) => Ok(()),
        (Verdict::Pass, Some(n), Some(s)) if s.passed() == n => Ok(()),
        (Verdict::Pass, Some(n), s) => Err(format!(
            "{} subtests passed, QEMU passes {n}",
            s.map_or("no".to_string(), |s| s.to_string())
        )),
        (v, _, _) => Err(v.to_string()),
    };
    match (passed, &entry.xfail) {
        (Ok(()), None) => Judgement::Passed,
        (Ok(()), Some(_)) => Judgement::UnexpectedPass,
        (Err(_), Some(why)) => Judgement::ExpectedFailure(why.clone()),
        (Err(e), None) => Judgement::Failed(e),
    }
}

/// `f` on each item on `jobs` threads; results in the items' order.
pub fn parallel<T: Sync, R: Send>(items: &[T], jobs: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            });
        }
    });
    results
        .into_iter()
        .filter_map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_count_every_kind_of_failure_and_skips() {
        let s = parse_summary("x\nSUMMARY: 1838 tests, 6 unexpected failures\n").unwrap();
        assert_eq!((s.tests, s.failures, s.passed()), (1838, 6, 1832));
        let s = parse_summary(
            "SUMMARY: 20 tests, 1 unexpected failures, 2 known failures, 3 expected failures, 4 skipped\r\n",
        )
        .unwrap();
        assert_eq!((s.failures, s.skipped, s.passed()), (6, 4, 10));
        assert_eq!(
            parse_summary("SUMMARY: 11 tests\n").unwrap().to_string(),
            "11/11"
        );
        assert_eq!(
            parse_summary("SUMMARY: 1 tests\n1\n2\n3\n4\n5\n"),
            None,
            "not in the tail"
        );
        assert_eq!(parse_summary("no summary\n"), None);
    }

    #[test]
    fn statuses_are_judged_as_the_suites_runner_judges_them() {
        let t = Duration::from_secs(30);
        assert_eq!(verdict_from_status(Some(1), "", t), Verdict::Pass);
        assert_eq!(
            verdict_from_status(Some(1), "[WARN vmm] x\nqemu: warning: y\n", t),
            Verdict::Pass
        );
        assert_eq!(
            verdict_from_status(Some(1), "vmm: error: --viommu: unknown key\n", t),
            Verdict::Fail("vmm: error: --viommu: unknown key".into())
        );
        assert_eq!(
            verdict_from_status(Some(3), "", t),
            Verdict::Fail("status 3".into())
        );
        assert!(matches!(
            verdict_from_status(Some(0), "", t),
            Verdict::Fail(_)
        ));
        assert_eq!(
            verdict_from_status(Some(77), "", t),
            Verdict::Skip(String::new())
        );
        assert_eq!(verdict_from_status(None, "", t), Verdict::Timeout(t));
        assert_eq!(
            verdict_from_status(Some(124), "", t).to_string(),
            "FAIL (timeout; 30s)"
        );
    }

    fn outcome(verdict: Verdict, summary: Option<&str>) -> Outcome {
        Outcome {
            verdict,
            summary: summary.and_then(parse_summary),
            duration: Duration::ZERO,
            log: String::new(),
        }
    }

    fn entry(subtests: Option<u32>, xfail: Option<&str>) -> Entry {
        Entry {
            name: "t".into(),
            subtests,
            xfail: xfail.map(str::to_string),
        }
    }

    #[test]
    fn a_list_test_passes_with_qemus_subtests_and_an_xfail_one_must_not_pass() {
        let pass11 = outcome(Verdict::Pass, Some("SUMMARY: 11 tests"));
        assert_eq!(judge(&entry(Some(11), None), &pass11), Judgement::Passed);
        assert_eq!(judge(&entry(None, None), &pass11), Judgement::Passed);
        let fewer = outcome(Verdict::Pass, Some("SUMMARY: 11 tests, 2 skipped"));
        assert!(judge(&entry(Some(11), None), &fewer).is_failure());
        let failed = outcome(Verdict::Fail("status 3".into()), None);
        assert_eq!(
            judge(&entry(Some(11), None), &failed),
            Judgement::Failed("FAIL (status 3)".into())
        );
        assert_eq!(
            judge(&entry(Some(11), Some("IR")), &failed),
            Judgement::ExpectedFailure("IR".into())
        );
        let xpass = judge(&entry(Some(11), Some("IR")), &pass11);
        assert_eq!(xpass, Judgement::UnexpectedPass);
        assert!(xpass.is_failure());
    }

    #[test]
    fn test_args_expand_as_the_shell_expands_them() {
        assert_eq!(expand_args("'cpuid'").unwrap(), "cpuid");
        assert_eq!(expand_args("\"a b\" c").unwrap(), "a b c");
        assert_eq!(expand_args("`echo 7`").unwrap(), "7");
        assert!(expand_args("'unterminated").is_err());
    }

    #[test]
    fn parallel_keeps_the_order() {
        let items: Vec<u32> = (0..20).collect();
        assert_eq!(
            parallel(&items, 3, |i| i * 2),
            (0..20).map(|i| i * 2).collect::<Vec<_>>()
        );
        assert!(parallel(&[] as &[u32], 2, |i| *i).is_empty());
    }
}
