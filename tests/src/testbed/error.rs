use std::fmt;
use std::path::PathBuf;

/// Why a testbed run could not produce the result a test asked for.
#[derive(thiserror::Error)]
pub enum TestbedError {
    /// The testbed cannot be built or started on this machine (missing packages, not root...).
    #[error("the nested testbed is unavailable: {0}")]
    Unavailable(String),
    /// `cargo build` of the vmm (or of another binary for L1) failed.
    #[error("building a binary for the testbed failed:\n{0}")]
    VmmBuild(String),
    /// The error of a run shared by several tests ([`super::Testbed::run_shared`]), as text.
    #[error("{0}")]
    Shared(String),
    /// A host-side I/O operation of the harness failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The run went wrong or did not show what was expected; carries the console's last lines.
    #[error("scenario `{scenario}`: {what}\n  full log: {log}\n--- last console lines ---\n{tail}\n--- end ---", log = log.display())]
    Run {
        scenario: String,
        what: String,
        log: PathBuf,
        tail: String,
    },
    /// L1 itself stopped, its heartbeat too: the nested testbed froze (a TCG nested-SVM weakness,
    /// resources/testbed/README.md), not the code under test. [`super::Testbed::run`] runs such a
    /// scenario once more before it reports this.
    #[error("scenario `{scenario}`: the testbed froze: {what}\n  full log: {log}\n--- last console lines ---\n{tail}\n--- end ---", log = log.display())]
    Frozen {
        scenario: String,
        what: String,
        log: PathBuf,
        tail: String,
    },
}

// Tests return `Result<(), TestbedError>`; the test runner prints errors with Debug, so make Debug
// readable (multi-line console tail) instead of an escaped struct dump.
impl fmt::Debug for TestbedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl TestbedError {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TestbedError::Io {
            context: context.into(),
            source,
        }
    }
}
