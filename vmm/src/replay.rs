//! `vmm replay`: runs recordings of a guest's VT-d traffic (`--viommu record=PATH`) through the
//! engine under every policy in one process, and prints one line per recording and policy in
//! the `trace=` format of `cargo bench -p viommu --bench invalidation`; optionally JSON and a
//! PNG chart (python3-matplotlib).
//!
//! Counts (host calls and flushes, page-table pages walked) come from a replay over a host that
//! keeps VFIO type1's rules; the engine's own time and heap allocations per descriptor from the
//! best of `--runs` replays over a host that does nothing, so host work is excluded.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use viommu::record::{Ending, ParseError, Recording};
use viommu::replay::{self, compare_with_live, Host, LiveMatch, Options, Outcome, Policy};

use crate::config::{ConfigError, InvalidReason, OptionList};

/// What `vmm replay` was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayConfig {
    pub recordings: Vec<PathBuf>,
    /// Bounds of the deferred policy.
    pub max_pending: usize,
    pub max_delay: Duration,
    /// Timed replays per policy (the best counts).
    pub runs: u32,
    pub json: Option<PathBuf>,
    pub png: Option<PathBuf>,
    /// Also measure what recording costs the engine (strict replays with and without one).
    pub overhead: bool,
}

/// Usage of `vmm replay`.
pub const REPLAY_USAGE: &str = "\
Usage: vmm replay PATH... [--deferred max-pending=N,max-delay=MS] [--runs N] [--json PATH]
                          [--png PATH] [--overhead]

Replays each recording (--viommu record=PATH; gzip-compressed or not) through the VT-d engine
under three policies in one process: per-leaf (what QEMU does: one host call per changed leaf,
descriptor by descriptor), strict (ours: batched up to each wait) and deferred (ours, host unmaps
queued up to max-pending mappings, default 256, or max-delay ms, default 10). One line each:
  trace=NAME policy=P calls=N map_calls=N unmap_calls=N flushes=N walks=N descriptors=N
    ns_per_desc=X allocs_per_desc=Y cpu_vs_per_leaf=R deferred_unmaps=N cancelled=N
    deferred_flushes=N peak_mappings=N peak_snapshots=N
and one line saying whether replaying it as recorded gives the live run's counters.
  --runs N      timed replays per policy, the best counts (default 5)
  --json PATH   everything as JSON;  --png PATH  a chart (needs python3-matplotlib)
  --overhead    what recording costs: strict replays timed without and with recording them
                (into a temporary file, as the VMM records), alternately, the best of --runs
                each; also the recorder's own estimate of its time (--stats-json's record.ns)";

/// Parses the arguments after `replay`.
pub fn parse_replay_args(args: &[String]) -> Result<ReplayConfig, ConfigError> {
    let mut c = ReplayConfig {
        recordings: Vec::new(),
        max_pending: 256,
        max_delay: Duration::from_millis(10),
        runs: 5,
        json: None,
        png: None,
        overhead: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &'static str| {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or(ConfigError::MissingValue(name))
        };
        match name {
            "--deferred" => {
                let v = value("--deferred")?;
                let list = OptionList::parse("--deferred", &v, &["max-pending", "max-delay"])?;
                if let Some(raw) = list.get("max-pending") {
                    c.max_pending = raw.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                        list.invalid("max-pending", raw, InvalidReason::NotAWholeNumber)
                    })?;
                }
                if let Some(raw) = list.get("max-delay") {
                    let ms: u64 = raw.parse().map_err(|_| {
                        list.invalid("max-delay", raw, InvalidReason::NotAWholeNumber)
                    })?;
                    c.max_delay = Duration::from_millis(ms);
                }
            }
            "--runs" => {
                let v = value("--runs")?;
                c.runs = v.parse().ok().filter(|n| (1..=100).contains(n)).ok_or(
                    ConfigError::InvalidValue {
                        option: "--runs",
                        key: "count",
                        value: v,
                        reason: InvalidReason::OutOfRange { min: 1, max: 100 },
                    },
                )?;
            }
            "--json" => c.json = Some(PathBuf::from(value("--json")?)),
            "--png" => c.png = Some(PathBuf::from(value("--png")?)),
            "--overhead" => c.overhead = true,
            _ if arg.starts_with('-') => return Err(ConfigError::UnknownArgument(arg.clone())),
            _ => c.recordings.push(PathBuf::from(arg)),
        }
    }
    if c.recordings.is_empty() {
        return Err(ConfigError::NoRecording);
    }
    Ok(c)
}

/// Why a replay could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ReplayCommandError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: ParseError,
    },
    #[error("{path}: {source}")]
    Replay {
        path: PathBuf,
        #[source]
        source: replay::ReplayError,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot draw {path}: {reason}")]
    Chart { path: PathBuf, reason: String },
}

/// Reads a recording, gunzipping it when it starts with gzip's magic.
pub fn load(path: &Path) -> Result<Recording, ReplayCommandError> {
    let read_err = |source| ReplayCommandError::Read {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(read_err)?;
    let data = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(read_err)?;
        out
    } else {
        raw
    };
    Recording::parse(&data).map_err(|source| ReplayCommandError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// The name a recording is reported under: its file name without `.vtdrec[.gz]`.
fn trace_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.trim_end_matches(".gz")
        .trim_end_matches(".vtdrec")
        .to_string()
}

/// One policy's results on one recording.
#[derive(Debug, serde::Serialize)]
pub struct PolicyResult {
    pub policy: String,
    pub calls: u64,
    pub map_calls: u64,
    pub unmap_calls: u64,
    pub flushes: u64,
    pub walks: u64,
    pub descriptors: u64,
    pub ns_per_desc: f64,
    pub allocs_per_desc: f64,
    /// ns_per_desc over the per-leaf policy's, in the same run.
    pub cpu_vs_per_leaf: f64,
    pub deferred_unmaps: u64,
    pub cancelled: u64,
    pub deferred_flushes: u64,
    pub host_errors: u64,
    pub peak_mappings: usize,
    pub peak_snapshots: usize,
}

/// One recording's results.
#[derive(Debug, serde::Serialize)]
pub struct RecordingResult {
    pub trace: String,
    pub path: PathBuf,
    pub events: usize,
    pub memory_changes: usize,
    /// "same", "differs: ..." or "unknown" (see [`LiveMatch`]).
    pub live: String,
    pub capped: bool,
    pub torn_reads: u64,
    /// What recording costs the engine (`--overhead`).
    pub record_overhead: Option<Overhead>,
    pub policies: Vec<PolicyResult>,
}

/// What recording costs the engine, from strict replays over a host that does nothing.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Overhead {
    /// The engine's ns per descriptor without recording.
    pub off_ns_per_desc: f64,
    /// The same with the replay recorded into a file, as the VMM records a guest.
    pub on_ns_per_desc: f64,
    /// The recorder's own estimate of its time per descriptor (the least of the runs): what
    /// the VMM's `--stats-json` reports as `record.ns`.
    pub recorder_ns_per_desc: f64,
}

impl Overhead {
    /// How much longer the engine takes with recording: on / off - 1.
    pub fn ratio(&self) -> f64 {
        self.on_ns_per_desc / self.off_ns_per_desc - 1.0
    }
}

/// Times strict replays of `rec` without and with recording them, alternately, so that both
/// see the machine in the same state; the recording goes to a file in the temporary directory
/// (removed after), so its `write(2)`s are paid as the VMM pays them. Each event counts its
/// quickest time over the runs: on a shared machine nearly every replay of a few milliseconds
/// is preempted somewhere, which the best whole replay does not filter out but the best time
/// of each event does.
fn overhead(
    rec: &Recording,
    runs: u32,
    allocations: &dyn Fn() -> u64,
) -> Result<Overhead, replay::ReplayError> {
    let path =
        std::env::temp_dir().join(format!("vmm-replay-overhead-{}.vtdrec", std::process::id()));
    let strict = Policy::strict();
    let plain = Options {
        event_times: true,
        ..Options::default()
    };
    let recorded = Options {
        record: Some(path.clone()),
        event_times: true,
    };
    let mut off: Vec<Duration> = Vec::new();
    let mut on: Vec<Duration> = Vec::new();
    let mut descriptors = 1;
    let mut recorder_ns = u64::MAX;
    let result = (0..runs).try_for_each(|_| {
        let o = replay::replay(rec, &strict, Host::Null, plain.clone(), allocations)?;
        keep_quickest(&mut off, &o.event_times);
        let o = replay::replay(rec, &strict, Host::Null, recorded.clone(), allocations)?;
        keep_quickest(&mut on, &o.event_times);
        descriptors = o.stats.descriptors.max(1);
        recorder_ns = recorder_ns.min(o.recording.map_or(0, |r| r.ns));
        Ok(())
    });
    let _ = std::fs::remove_file(&path);
    result?;
    let per_desc =
        |times: &[Duration]| times.iter().sum::<Duration>().as_nanos() as f64 / descriptors as f64;
    Ok(Overhead {
        off_ns_per_desc: per_desc(&off),
        on_ns_per_desc: per_desc(&on),
        recorder_ns_per_desc: recorder_ns as f64 / descriptors as f64,
    })
}

/// Keeps in `best` the quicker of its time and `times`' for each event.
fn keep_quickest(best: &mut Vec<Duration>, times: &[Duration]) {
    if best.is_empty() {
        best.extend_from_slice(times);
    }
    for (b, t) in best.iter_mut().zip(times) {
        *b = (*b).min(*t);
    }
}

/// The best of `runs` timed replays: (ns per descriptor, allocations per descriptor).
fn timed(
    rec: &Recording,
    policy: &Policy,
    runs: u32,
    allocations: &dyn Fn() -> u64,
) -> Result<(f64, f64), replay::ReplayError> {
    let mut best = (f64::INFINITY, f64::INFINITY);
    for _ in 0..runs {
        let o = replay::replay(rec, policy, Host::Null, Options::default(), allocations)?;
        best = (
            best.0.min(o.ns_per_descriptor()),
            best.1.min(o.allocations_per_descriptor()),
        );
    }
    Ok(best)
}

fn result(policy: &Policy, counted: &Outcome, (ns, allocs): (f64, f64)) -> PolicyResult {
    let s = &counted.stats;
    PolicyResult {
        policy: policy.name.clone(),
        calls: counted.host_calls(),
        map_calls: s.host_map_calls,
        unmap_calls: s.host_unmap_calls,
        flushes: counted.host_flushes(),
        walks: s.pages_walked,
        descriptors: s.descriptors,
        ns_per_desc: ns,
        allocs_per_desc: allocs,
        cpu_vs_per_leaf: 1.0,
        deferred_unmaps: s.deferred_unmaps,
        cancelled: s.deferred_unmaps_cancelled,
        deferred_flushes: s.deferred_flushes,
        host_errors: s.host_errors,
        peak_mappings: counted.peak.host_mappings,
        peak_snapshots: counted.peak.snapshots,
    }
}

/// Replays one recording under every policy.
pub fn replay_one(
    path: &Path,
    c: &ReplayConfig,
    allocations: &dyn Fn() -> u64,
) -> Result<RecordingResult, ReplayCommandError> {
    let rec = load(path)?;
    let err = |source| ReplayCommandError::Replay {
        path: path.to_path_buf(),
        source,
    };
    let policies = [
        Policy::per_leaf(),
        Policy::strict(),
        Policy::deferred(c.max_pending, c.max_delay),
    ];
    let mut results = Vec::new();
    for policy in &policies {
        let counted =
            replay::replay(&rec, policy, Host::Type1, Options::default(), &|| 0).map_err(err)?;
        let cost = timed(&rec, policy, c.runs, allocations).map_err(err)?;
        results.push(result(policy, &counted, cost));
    }
    let base = results[0].ns_per_desc;
    for r in &mut results {
        r.cpu_vs_per_leaf = r.ns_per_desc / base;
    }
    let as_recorded = Policy {
        name: "as-recorded".into(),
        strategy: rec.header.config.strategy,
        flush: rec.header.config.flush,
    };
    let again =
        replay::replay(&rec, &as_recorded, Host::Type1, Options::default(), &|| 0).map_err(err)?;
    let live = match compare_with_live(&rec, &again.stats) {
        LiveMatch::Same => "same".to_string(),
        LiveMatch::Differ(d) => format!(
            "differs: {}",
            d.iter()
                .map(|(k, a, b)| format!("{k} live {a} replayed {b}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        LiveMatch::Unknown => "unknown".to_string(),
    };
    let record_overhead = if c.overhead {
        Some(overhead(&rec, c.runs, allocations).map_err(err)?)
    } else {
        None
    };
    let (capped, torn_reads) = match &rec.ending {
        Ending::Capped => (true, 0),
        Ending::End { torn_reads, .. } => (false, *torn_reads),
    };
    Ok(RecordingResult {
        trace: trace_name(path),
        path: path.to_path_buf(),
        events: rec.steps.len(),
        memory_changes: rec.memory.len(),
        live,
        capped,
        torn_reads,
        record_overhead,
        policies: results,
    })
}

/// The lines `vmm replay` prints for one recording.
pub fn lines(r: &RecordingResult) -> Vec<String> {
    let mut out: Vec<String> = r
        .policies
        .iter()
        .map(|p| {
            format!(
                "trace={} policy={} calls={} map_calls={} unmap_calls={} flushes={} walks={} \
                 descriptors={} ns_per_desc={:.0} allocs_per_desc={:.2} cpu_vs_per_leaf={:.2} \
                 deferred_unmaps={} cancelled={} deferred_flushes={} peak_mappings={} \
                 peak_snapshots={}",
                r.trace,
                p.policy,
                p.calls,
                p.map_calls,
                p.unmap_calls,
                p.flushes,
                p.walks,
                p.descriptors,
                p.ns_per_desc,
                p.allocs_per_desc,
                p.cpu_vs_per_leaf,
                p.deferred_unmaps,
                p.cancelled,
                p.deferred_flushes,
                p.peak_mappings,
                p.peak_snapshots,
            )
        })
        .collect();
    let mut tail = format!(
        "trace={} events={} memory_changes={} torn_reads={} live={}{}",
        r.trace,
        r.events,
        r.memory_changes,
        r.torn_reads,
        r.live,
        if r.capped {
            " (capped: the recording stops early)"
        } else {
            ""
        }
    );
    if let Some(o) = &r.record_overhead {
        tail += &format!(
            " strict_ns_per_desc={:.0} recording_ns_per_desc={:.0} record_overhead={:.1}% \
             recorder_ns_per_desc={:.0}",
            o.off_ns_per_desc,
            o.on_ns_per_desc,
            o.ratio() * 100.0,
            o.recorder_ns_per_desc,
        );
    }
    out.push(tail);
    out
}

/// The chart: per recording, host calls, host flushes and the engine's ns per descriptor of
/// each policy.
const CHART: &str = include_str!("replay_chart.py");

fn chart(json: &Path, png: &Path) -> Result<(), ReplayCommandError> {
    use std::io::Write;
    let fail = |reason: String| ReplayCommandError::Chart {
        path: png.to_path_buf(),
        reason,
    };
    let mut child = std::process::Command::new("python3")
        .arg("-")
        .arg(json)
        .arg(png)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run python3: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(CHART.as_bytes())
            .map_err(|e| fail(format!("python3: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("python3: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("failed").to_string();
        return Err(fail(format!(
            "python3 (apt-get install python3-matplotlib): {last}"
        )));
    }
    Ok(())
}

/// Runs `vmm replay`: prints the lines, writes the JSON and the chart when asked.
pub fn run(c: &ReplayConfig, allocations: &dyn Fn() -> u64) -> Result<(), ReplayCommandError> {
    let mut all = Vec::new();
    for path in &c.recordings {
        let r = replay_one(path, c, allocations)?;
        for line in lines(&r) {
            println!("{line}");
        }
        all.push(r);
    }
    let json_path = match (&c.json, &c.png) {
        (Some(j), _) => Some(j.clone()),
        (None, Some(p)) => Some(p.with_extension("json")),
        (None, None) => None,
    };
    if let Some(j) = &json_path {
        let text = serde_json::json!({
            "deferred": {
                "max_pending": c.max_pending,
                "max_delay_ms": c.max_delay.as_millis() as u64,
            },
            "runs": c.runs,
            "recordings": all,
        });
        std::fs::write(j, format!("{text:#}\n")).map_err(|source| ReplayCommandError::Write {
            path: j.clone(),
            source,
        })?;
    }
    if let (Some(png), Some(j)) = (&c.png, &json_path) {
        chart(j, png)?;
    }
    Ok(())
}
