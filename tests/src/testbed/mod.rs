//! The nested testbed harness: L0 QEMU (TCG, nested SVM, emulated VT-d, NVMe, edu) boots an L1
//! Linux with real KVM and VFIO; L1 runs a scenario script, usually an L2 Linux under a VMM; the
//! whole console streams to `target/testbed/logs/<scenario>.log` and `@@TB` markers report facts.
//!
//! ```no_run
//! use integration::testbed::{self, L2Vmm, Scenario};
//! # fn main() -> Result<(), testbed::TestbedError> {
//! // The one guard: None (with a loud reason) when the testbed cannot run here; panics if CI=true.
//! let Some(tb) = testbed::require() else { return Ok(()) };
//! let out = tb.run(&Scenario::l2_boot("my-test", L2Vmm::Ours).cpus(2).memory_mib(384))?;
//! let init = out.l2_init()?;
//! out.ensure(init.cpus == 2, "L2 did not see 2 CPUs")?;
//! out.ensure(out.vmm_exit()? == 0, "vmm exited non-zero")?;
//! # Ok(()) }
//! ```
//!
//! Runs are serialized (a file lock: also across test binaries) because L0 is a TCG guest that
//! wants the machine's cores. The shell side lives in `resources/testbed/` (see its README).
//! Environment: `TB_VERBOSE=1` echoes the console to stderr; `TB_VMM=PATH` uses a prebuilt vmm
//! instead of building one; `TB_TIMEOUT_SCALE=2` doubles every timeout (a loaded machine);
//! `TB_L2_CMDLINE_EXTRA` appends to every L2 command line; `CI=true` turns skips into failures.

mod console;
mod error;
mod outcome;
mod run;
mod scenario;
pub mod viommu;

pub use console::{Line, Marker, MARKER_PREFIX};
pub use error::TestbedError;
pub use outcome::{L2Init, Outcome, TAIL_LINES};
pub use run::{require, Testbed};
pub use scenario::{shell_quote, Body, L1Kernel, L2Boot, L2Vmm, Scenario, L2_BASE_CMDLINE};
