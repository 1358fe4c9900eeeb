//! The `vmm` binary: parse the command line, build the VM, run it, turn the outcome into an
//! exit code and at most one line on stderr.

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use viommu::record::RecordSummary;
use vmm::config::{parse_args, Command, USAGE};
use vmm::devices::vtd::{self, SharedVtd};
use vmm::{MachineConfig, VmExit, Vmm};

/// Counts heap allocations while `vmm replay` runs, which reports them per descriptor; a VM run
/// leaves it off (one relaxed load per allocation).
struct CountingAlloc;

static COUNT_ALLOCATIONS: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNT_ALLOCATIONS.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` or `realloc` here, i.e. from the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNT_ALLOCATIONS.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as for `alloc` and `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmm: error: {msg}");
    ExitCode::FAILURE
}

/// Writes `json` to `path` whole: written aside and renamed into place, so a reader never
/// sees a half-written file.
fn write_json(path: &std::path::Path, json: &serde_json::Value) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{json:#}\n"))?;
    std::fs::rename(&tmp, path)
}

/// Writes the VT-d counters (all zero without a VT-d) as one JSON object; `record` is what the
/// finished recording cost, when there was one (while recording, the unit says).
fn write_stats(
    path: &std::path::Path,
    vtd: Option<&SharedVtd>,
    record: Option<RecordSummary>,
) -> std::io::Result<()> {
    write_json(path, &vtd::stats_json(vtd, record))
}

/// Writes the protocol checker's report: every violation kept, with counts by kind.
fn write_check_report(path: &std::path::Path, vtd: &SharedVtd) -> std::io::Result<()> {
    let v = vtd::lock(vtd);
    let json = serde_json::to_value(v.check_report()).map_err(std::io::Error::other)?;
    write_json(path, &json)
}

/// While the VM runs, rewrites the stats file every 100 ms, so a benchmark can read the counters
/// between workloads of one guest boot (the final write after the VM stops is the caller's).
fn spawn_stats_writer(
    path: std::path::PathBuf,
    vtd: SharedVtd,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(100));
            if let Err(e) = write_stats(&path, Some(&vtd), None) {
                log::warn!("cannot write {}: {e}", path.display());
                return;
            }
        }
    });
    (stop, handle)
}

fn main() -> ExitCode {
    // Quiet unless RUST_LOG asks; logs go to stderr.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();

    let cfg = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("vmm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Command::ReplayHelp) => {
            println!("{}", vmm::replay::REPLAY_USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Replay(c)) => {
            COUNT_ALLOCATIONS.store(true, Ordering::Relaxed);
            return match vmm::replay::run(&c, &|| ALLOCATIONS.load(Ordering::Relaxed)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            };
        }
        Ok(Command::Run(cfg)) => *cfg,
        Err(e) => return fail(e),
    };

    // Bad --device input fails here, before any VM state exists.
    if let Err(e) = vmm::device_manager::vfio::check_devices(&cfg.devices) {
        return fail(e);
    }
    let mut vmm = match Vmm::build(MachineConfig::from_vm_config(&cfg)) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    // The emulated edu first: it takes the first free slot, the assigned devices the next
    // (the slots a --device addr= names were held for it when the VM was built).
    if cfg.edu {
        if let Err(e) = vmm.add_edu() {
            return fail(e);
        }
    }
    if let Err(e) = vmm.assign_devices() {
        return fail(e);
    }
    let vtd = vmm.vtd().cloned();
    let writer = match (&cfg.stats_json, &vtd) {
        (Some(path), Some(v)) => Some(spawn_stats_writer(path.clone(), v.clone())),
        _ => None,
    };
    // The final counters are those of the guest's run: written once the vCPUs stopped, before
    // the teardown adds its own host calls.
    let mut stats_written = Ok(());
    let outcome = vmm.run_with(|_| {
        if let Some((stop, handle)) = writer {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = handle.join();
        }
        // The recording closes with the same counters the stats file gets.
        let record = vtd.as_ref().and_then(|v| vtd::lock(v).finish_recording());
        if let Some(r) = record.filter(|r| r.capped || r.failed) {
            log::warn!("VT-d recording incomplete: {r:?}");
        }
        if let Some(path) = &cfg.stats_json {
            stats_written = write_stats(path, vtd.as_ref(), record)
                .map_err(|e| format!("cannot write {}: {e}", path.display()));
        }
        let report = cfg.viommu.as_ref().and_then(|c| c.check_report.as_ref());
        if let (Some(path), Some(v), Ok(())) = (report, &vtd, &stats_written) {
            stats_written = write_check_report(path, v)
                .map_err(|e| format!("cannot write {}: {e}", path.display()));
        }
    });
    if let Err(e) = stats_written {
        return fail(e);
    }
    match outcome {
        Ok(VmExit::PowerOff) => {
            log::info!("guest powered off");
            ExitCode::SUCCESS
        }
        Ok(VmExit::Reboot { cause }) => {
            eprintln!("vmm: guest rebooted ({cause}); exiting");
            ExitCode::SUCCESS
        }
        Ok(VmExit::Halted) => {
            eprintln!("vmm: guest halted");
            ExitCode::SUCCESS
        }
        // A test kernel's verdict: QEMU's status, nothing on stderr (runners read the status).
        Ok(exit @ VmExit::DebugExit { .. }) => {
            log::info!("guest wrote to isa-debug-exit: {exit:?}");
            ExitCode::from(exit.exit_code() as u8)
        }
        Ok(VmExit::GuestPanic) => {
            eprintln!("vmm: guest kernel panicked");
            ExitCode::FAILURE
        }
        Ok(VmExit::Failed(msg)) => fail(msg),
        Err(e) => fail(e),
    }
}
