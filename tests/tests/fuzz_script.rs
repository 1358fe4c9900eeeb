//! `resources/fuzz.sh`, the test command's fuzzing stage, run in a copy of the tree's layout with
//! a stand-in `cargo` on PATH that plays cargo-fuzz: a regression input that crashes again must
//! fail the run before any fuzzing, and inputs that pass must let the fuzzing go on.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// cargo-fuzz as far as fuzz.sh uses it: one target, builds that succeed, a replay of the given
/// inputs that crashes when `$FAKE_REPLAY_CRASH` is set, and a fuzzing run that finds nothing.
/// Every call's arguments go to `$FAKE_CARGO_LOG`.
const FAKE_CARGO: &str = r#"#!/usr/bin/env bash
echo "$*" >>"$FAKE_CARGO_LOG"
[ "$1" = fuzz ] || exit 2
case "$2" in
  --version) echo "cargo-fuzz 0.0.0-stand-in" ;;
  list) echo vtd_registers ;;
  build) ;;
  run)
    if [[ " $* " == *" -runs=1 "* ]]; then
      if [ -n "${FAKE_REPLAY_CRASH:-}" ]; then
        echo "==4242== ERROR: libFuzzer: deadly signal"
        echo "SUMMARY: libFuzzer: deadly signal"
        exit 77
      fi
      echo "Executed $# inputs in 1 ms"
    else
      echo "Done 1000 runs in 1 second(s)"
    fi
    ;;
  *) exit 2 ;;
esac
"#;

/// A copy of the tree's layout in a fresh directory: the script, one regression input of the
/// stand-in's target, and the stand-in `cargo` in `bin/`.
struct Tree {
    root: PathBuf,
}

impl Tree {
    fn new(name: &str) -> Tree {
        let root = std::env::temp_dir().join(format!("fuzz-script-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        fs::create_dir_all(root.join("resources")).expect("resources/");
        fs::copy(
            workspace.join("resources/fuzz.sh"),
            root.join("resources/fuzz.sh"),
        )
        .expect("copy fuzz.sh");
        let regressions = root.join("fuzz/regressions/vtd_registers");
        fs::create_dir_all(&regressions).expect("regressions/");
        fs::write(regressions.join("crash-1"), b"\x01\x02").expect("an input");
        fs::create_dir_all(root.join("bin")).expect("bin/");
        let cargo = root.join("bin/cargo");
        fs::write(&cargo, FAKE_CARGO).expect("stand-in cargo");
        fs::set_permissions(&cargo, fs::Permissions::from_mode(0o755)).expect("chmod");
        Tree { root }
    }

    /// Runs `bash resources/fuzz.sh 1` with the stand-in first on PATH.
    fn run(&self, replay_crashes: bool) -> Output {
        let path = format!(
            "{}:{}",
            self.root.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("bash");
        cmd.arg(self.root.join("resources/fuzz.sh"))
            .arg("1")
            .env("PATH", path)
            .env("FAKE_CARGO_LOG", self.root.join("cargo.log"))
            .env_remove("FAKE_REPLAY_CRASH");
        if replay_crashes {
            cmd.env("FAKE_REPLAY_CRASH", "1");
        }
        cmd.output().expect("run bash")
    }

    /// The stand-in's calls, one per line.
    fn calls(&self) -> Vec<String> {
        fs::read_to_string(self.root.join("cargo.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_regression_input_that_crashes_again_fails_the_run_before_any_fuzzing() {
    let tree = Tree::new("crash");
    let out = tree.run(true);
    assert!(!out.status.success(), "{}", describe(&out));
    let calls = tree.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("fuzz run vtd_registers") && c.contains("crash-1")),
        "the input was replayed: {calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.contains("-max_total_time")),
        "fuzzing started after a failed replay: {calls:?}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("deadly signal"),
        "libFuzzer's report is shown: {}",
        describe(&out)
    );
}

#[test]
fn regression_inputs_that_pass_let_the_fuzzing_run() {
    let tree = Tree::new("pass");
    let out = tree.run(false);
    assert!(out.status.success(), "{}", describe(&out));
    let calls = tree.calls();
    let replay = calls
        .iter()
        .position(|c| c.starts_with("fuzz run vtd_registers") && c.ends_with("-runs=1"));
    let fuzz = calls
        .iter()
        .position(|c| c.starts_with("fuzz run vtd_registers") && c.ends_with("-max_total_time=1"));
    assert!(
        matches!((replay, fuzz), (Some(r), Some(f)) if r < f),
        "replayed, then fuzzed: {calls:?}"
    );
}
