//! Runs kvm-unit-tests' x86 tests under our vmm (and, with `--qemu`, under QEMU with KVM, one
//! after the other) and prints one table; `resources/kvm-unit-tests.sh` builds and runs it.
//! Exits non-zero when a test on the pass list fails on ours (or passes though marked xfail).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use integration::kvm_unit_tests::pass_list::{self, Entry};
use integration::kvm_unit_tests::runner::{parallel, Judgement, Outcome, Suite, Verdict};
use integration::kvm_unit_tests::table::{self, Row};
use integration::kvm_unit_tests::{suite, vmm_binary};

const USAGE: &str = "\
Usage: kvm-unit-tests [--qemu] [--pass-list] [--all] [-j N] [--markdown] [--logs DIR]
                      [--refresh-pass-list] [TEST...]

Runs the x86 tests of kvm-unit-tests' x86/unittests.cfg (the suite built from the shared
tarball into target/kvm-unit-tests) under our vmm, with each test's smp, test_args and
qemu_params mapped to our options and its timeout ($TIMEOUT, else the file's, else 90 s), and
prints one table. Tests the suite's runner would skip here (arch, nodefault, check) are listed,
not run.

  --qemu               also run each test under qemu-system-x86_64 -accel kvm through the
                       suite's x86/run, before ours (one test at a time unless -j says more)
  --pass-list          only the tests on tests/kvm-unit-tests/qemu-passes.txt
  --all                also the tests marked nodefault
  -j N                 tests run side by side (default 2, or 1 with --qemu: times compared)
  --markdown           print the table in Markdown
  --logs DIR           write what each run printed to DIR/TEST.ours.log (and .qemu.log)
  --refresh-pass-list  with --qemu over all tests: rewrite the pass list from the tests QEMU
                       passes (keeping the xfail markers of those still on it)

Tests on the pass list must pass on ours with QEMU's subtest count; the exit status is 1 when
one does not, or when one marked xfail passes. The vmm is $KUT_VMM, else a debug build.";

struct Args {
    qemu: bool,
    pass_list: bool,
    all: bool,
    jobs: Option<usize>,
    markdown: bool,
    refresh: bool,
    logs: Option<PathBuf>,
    tests: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        qemu: false,
        pass_list: false,
        all: false,
        jobs: None,
        markdown: false,
        refresh: false,
        logs: None,
        tests: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--qemu" => a.qemu = true,
            "--pass-list" => a.pass_list = true,
            "--all" => a.all = true,
            "--markdown" => a.markdown = true,
            "--refresh-pass-list" => a.refresh = true,
            "-j" => {
                let n = it.next().ok_or("-j needs a number")?;
                let n = n.parse().map_err(|_| format!("-j {n}: not a number"))?;
                a.jobs = Some(n);
            }
            "--logs" => a.logs = Some(it.next().ok_or("--logs needs a directory")?.into()),
            "-h" | "--help" => return Err(USAGE.to_string()),
            t if !t.starts_with('-') => a.tests.push(t.to_string()),
            other => return Err(format!("unknown argument '{other}'\n\n{USAGE}")),
        }
    }
    if a.refresh && !(a.qemu && a.tests.is_empty() && !a.pass_list) {
        return Err(
            "--refresh-pass-list needs --qemu and every test (no TEST, no --pass-list)".into(),
        );
    }
    Ok(a)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("kvm-unit-tests: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs what the arguments ask; Ok(false) when the pass list is not met.
fn run() -> Result<bool, String> {
    let args = parse_args()?;
    let dir = suite()?;
    let suite = Suite::load(dir)?;
    vmm_binary()?;
    if args.qemu && which("qemu-system-x86_64").is_none() {
        return Err("--qemu: qemu-system-x86_64 is not on PATH".into());
    }
    let list_path = pass_list::path();
    let list_text = std::fs::read_to_string(&list_path)
        .map_err(|e| format!("cannot read {}: {e}", list_path.display()))?;
    let list = pass_list::parse(&list_text).map_err(|e| format!("{}: {e}", list_path.display()))?;
    let notes = std::fs::read_to_string(table::notes_path())
        .map(|t| table::parse_notes(&t))
        .unwrap_or_default();

    let names: Vec<String> = if !args.tests.is_empty() {
        args.tests.clone()
    } else if args.pass_list {
        list.iter().map(|e| e.name.clone()).collect()
    } else {
        suite.tests.iter().map(|t| t.name.clone()).collect()
    };
    let jobs = args.jobs.unwrap_or(if args.qemu { 1 } else { 2 });
    if let Some(dir) = &args.logs {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let rows = parallel(&names, jobs, |name| {
        // Named tests and the list's run even when marked nodefault, as the suite's -a would.
        let all = args.all || args.pass_list || !args.tests.is_empty();
        let row = suite.run_row(name, args.qemu, all, &list, &notes);
        eprintln!("{}", progress_line(&row));
        if let Some(dir) = &args.logs {
            write_logs(dir, &row);
        }
        row
    });

    let rendered = if args.markdown {
        table::render_markdown(&rows, args.qemu)
    } else {
        table::render_text(&rows, args.qemu)
    };
    print!("{rendered}");
    println!();
    let ok = report(&rows, &list, args.qemu);
    if args.refresh {
        refresh(&list_path, &list_text, &list, &rows)?;
    }
    Ok(ok)
}

/// Writes what each side of `row` printed into `dir`; a failure is said, not fatal.
fn write_logs(dir: &Path, row: &Row) {
    for (side, outcome) in [("ours", &row.ours), ("qemu", &row.qemu)] {
        let Some(o) = outcome else { continue };
        let path = dir.join(format!("{}.{side}.log", row.name));
        if let Err(e) = std::fs::write(&path, &o.log) {
            eprintln!("kvm-unit-tests: cannot write {}: {e}", path.display());
        }
    }
}

fn progress_line(row: &Row) -> String {
    let show = |o: &Option<Outcome>| {
        o.as_ref().map_or("-".to_string(), |o| {
            format!("{} {:.2}s", o.verdict, o.duration.as_secs_f64())
        })
    };
    format!(
        "{}: QEMU {}, ours {}",
        row.name,
        show(&row.qemu),
        show(&row.ours)
    )
}

/// Prints the counts and the goals; false when the pass list is not met.
fn report(rows: &[Row], list: &[Entry], qemu: bool) -> bool {
    let passes = |pick: fn(&Row) -> Option<&Verdict>| {
        rows.iter()
            .filter(|r| pick(r) == Some(&Verdict::Pass))
            .count()
    };
    let ours = passes(|r| r.ours.as_ref().map(|o| &o.verdict));
    print!("{} tests: ours passes {ours}", rows.len());
    if qemu {
        print!(
            ", QEMU passes {}",
            passes(|r| r.qemu.as_ref().map(|o| &o.verdict))
        );
    }
    println!();
    let judged: Vec<(&str, &Judgement)> = rows
        .iter()
        .filter_map(|r| Some((r.name.as_str(), r.judgement.as_ref()?)))
        .collect();
    let failures: Vec<&(&str, &Judgement)> =
        judged.iter().filter(|(_, j)| j.is_failure()).collect();
    if !judged.is_empty() {
        let expected = judged
            .iter()
            .filter(|(_, j)| matches!(j, Judgement::ExpectedFailure(_)))
            .count();
        println!(
            "pass list ({} tests): {} pass as on QEMU, {expected} expected failures, {} failures",
            list.len(),
            judged.len() - expected - failures.len(),
            failures.len()
        );
        for (name, j) in &failures {
            println!("  {name}: {j}");
        }
    }
    if qemu {
        let slow = table::slower_than(rows, 2.0);
        if slow.is_empty() {
            println!("goal met: no test QEMU passes takes ours more than 2x QEMU's time");
        } else {
            for (name, ratio) in slow {
                println!("goal missed: {name} takes ours {ratio:.2}x QEMU's time");
            }
        }
    }
    failures.is_empty()
}

/// Rewrites the pass list from the tests QEMU passed.
fn refresh(
    path: &std::path::Path,
    old_text: &str,
    old: &[Entry],
    rows: &[Row],
) -> Result<(), String> {
    let passed: Vec<(String, Option<u32>)> = rows
        .iter()
        .filter_map(|r| {
            let q = r.qemu.as_ref().filter(|q| q.verdict == Verdict::Pass)?;
            Some((r.name.clone(), q.summary.map(|s| s.passed())))
        })
        .collect();
    let new = pass_list::refreshed(old, &passed);
    std::fs::write(path, pass_list::render(&pass_list::header(old_text), &new))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("{}: {} tests QEMU passes", path.display(), new.len());
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}
