//! Replaying a recording (see [`crate::record`]) through the unit under a chosen policy, without
//! the guest: the guest memory the unit read is put back before each event, the unit's clock
//! shows each event's time, and the devices it remaps get a host that keeps VFIO type1's rules
//! (to count calls and flushes) or one that does nothing (to time the engine alone).
//!
//! Every policy sees the same events against the same guest memory. Only the deferred policy
//! depends on time: with the recording's own flush mode, the VMM's recorded timer polls are
//! replayed; with other bounds, polls are made where the VMM's timer would have fired (every
//! quarter of the delay bound, at least 1 ms apart) and found something due. A poll that finds
//! nothing due changes nothing, so it is neither recorded nor replayed.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use vm_device::interrupt::MsiMessage;

use crate::intremap::{IecScope, InterruptRoutes, Translate};
use crate::record::{Ending, Event, RecordSummary, Recorder, Recording};
use crate::stats::Footprint;
use crate::testing::{NullHost, SharedHost, SimHost};
use crate::{Clock, ConfigError, FlushMode, HostDma, MsiSink, SourceId, Stats, SyncStrategy, Vtd};

/// How the unit turns invalidations into host work, for one replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `per-leaf` (QEMU-like), `strict` or `deferred`.
    pub name: String,
    pub strategy: SyncStrategy,
    pub flush: FlushMode,
}

impl Policy {
    /// What QEMU does: each descriptor synced at once, one host call per changed leaf.
    pub fn per_leaf() -> Self {
        Policy {
            name: "per-leaf".into(),
            strategy: SyncStrategy::PerLeaf,
            flush: FlushMode::Strict,
        }
    }

    /// Ours, strict: batched up to each wait.
    pub fn strict() -> Self {
        Policy {
            name: "strict".into(),
            strategy: SyncStrategy::Batched,
            flush: FlushMode::Strict,
        }
    }

    /// Ours, deferred with these bounds.
    pub fn deferred(max_pending: usize, max_delay: Duration) -> Self {
        Policy {
            name: "deferred".into(),
            strategy: SyncStrategy::Batched,
            flush: FlushMode::Deferred {
                max_pending,
                max_delay,
            },
        }
    }
}

/// The host the replayed unit's devices get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// Keeps VFIO type1's rules (a map may not overlap, an unmap removes whole mappings, at
    /// most 65535 of them), so refused calls show as they would on a real host.
    Type1,
    /// Accepts every call and does nothing: times the engine alone.
    Null,
}

/// What else a replay does.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Records the replay itself into this file, as the VMM records a guest, to measure what
    /// recording costs the engine.
    pub record: Option<PathBuf>,
    /// Keeps the time of each event in [`Outcome::event_times`].
    pub event_times: bool,
}

/// What a replay did.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// The unit's counters at the end.
    pub stats: Stats,
    /// Time spent inside the unit's entry points.
    pub busy: Duration,
    /// Heap allocations made inside them, as the caller's meter counted.
    pub allocations: u64,
    /// Events handled, synthesized timer polls included.
    pub events: u64,
    /// The most the engine held at once (by host mappings), and the snapshots at most.
    pub peak: Footprint,
    /// Time spent inside the unit's entry points for each event, in order
    /// ([`Options::event_times`]; else empty).
    pub event_times: Vec<Duration>,
    /// What recording the replay wrote and cost ([`Options::record`]).
    pub recording: Option<RecordSummary>,
}

impl Outcome {
    pub fn host_calls(&self) -> u64 {
        self.stats.host_map_calls + self.stats.host_unmap_calls
    }

    /// Host mappings removed: one host IOTLB flush each under VFIO type1.
    pub fn host_flushes(&self) -> u64 {
        self.stats.host_mappings_removed
    }

    /// The unit's own time per descriptor, in ns.
    pub fn ns_per_descriptor(&self) -> f64 {
        self.busy.as_nanos() as f64 / self.stats.descriptors.max(1) as f64
    }

    pub fn allocations_per_descriptor(&self) -> f64 {
        self.allocations as f64 / self.stats.descriptors.max(1) as f64
    }
}

/// A recording that cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot lay out the recorded guest RAM ({regions:x?}): {source}")]
    Memory {
        regions: Vec<(u64, u64)>,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("the recorded unit configuration is refused: {0}")]
    Config(#[source] ConfigError),
    #[error("a recorded memory change at {0:#x} is outside the recorded RAM")]
    Change(u64),
    #[error("cannot create the recording of the replay {path}: {source}")]
    RecordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The unit's clock during a replay: the time of the event being handled.
#[derive(Clone, Default)]
struct ReplayClock(Arc<AtomicU64>);

impl ReplayClock {
    fn set(&self, t: Duration) {
        self.0.store(
            u64::try_from(t.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

impl Clock for ReplayClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

struct NoMsi;

impl MsiSink for NoMsi {
    fn send(&self, _: u64, _: u32) {}
}

/// The VMM's route holder during a replay: at each call it re-translates what the live holder
/// did at its call of the same event, in order.
#[derive(Clone, Default)]
struct ReplayRoutes(Arc<Mutex<VecDeque<Vec<Route>>>>);

/// A route as the recording names it: the source and the message it raises.
type Route = (SourceId, MsiMessage);

impl ReplayRoutes {
    /// The calls the live holder made during the next event.
    fn expect(&self, calls: &[Vec<Route>]) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.clear();
        q.extend(calls.iter().cloned());
    }
}

impl InterruptRoutes for ReplayRoutes {
    fn retranslate(&mut self, _: IecScope, translate: &mut Translate<'_>) {
        let call = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
        for (source, msg) in call.unwrap_or_default() {
            let _ = translate(source, msg);
        }
    }
}

/// The period of the VMM's deferred-flush timer for `max_delay` (vmm's `DeferredFlushTimer`).
/// The first tick after `tick` of a timer ticking every `period` that is at or past `at`
/// (saturating at [`Duration::MAX`]).
pub(crate) fn tick_at_or_after(tick: Duration, at: Duration, period: Duration) -> Duration {
    const NANOS: u128 = 1_000_000_000;
    let p = period.as_nanos().max(1);
    let k = at
        .as_nanos()
        .saturating_sub(tick.as_nanos())
        .div_ceil(p)
        .max(1);
    let ns = tick.as_nanos().saturating_add(k.saturating_mul(p));
    match u64::try_from(ns / NANOS) {
        // The remainder is below NANOS, so it fits.
        Ok(secs) => Duration::new(secs, (ns % NANOS) as u32),
        Err(_) => Duration::MAX,
    }
}

fn timer_period(max_delay: Duration) -> Duration {
    (max_delay / 4).max(Duration::from_millis(1))
}

/// Replays `rec` under `policy` with `host`. `allocations` reads the caller's count of heap
/// allocations (a constant function when it keeps none).
pub fn replay(
    rec: &Recording,
    policy: &Policy,
    host: Host,
    options: Options,
    allocations: &dyn Fn() -> u64,
) -> Result<Outcome, ReplayError> {
    let regions = &rec.header.regions;
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|&(s, l)| (GuestAddress(s), usize::try_from(l).unwrap_or(usize::MAX)))
        .collect();
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|source| ReplayError::Memory {
            regions: regions.clone(),
            source,
        })?;
    let clock = ReplayClock::default();
    let config = crate::VtdConfig {
        strategy: policy.strategy,
        flush: policy.flush,
        ..rec.header.config
    };
    let mut vtd = Vtd::new(
        config,
        mem.clone(),
        Box::new(NoMsi),
        Box::new(clock.clone()),
    )
    .map_err(ReplayError::Config)?;
    let routes = ReplayRoutes::default();
    vtd.set_interrupt_routes(Box::new(routes.clone()));
    if let Some(path) = &options.record {
        let recorder =
            Recorder::create(path, u64::MAX).map_err(|source| ReplayError::RecordFile {
                path: path.clone(),
                source,
            })?;
        // A fresh unit always takes a recording.
        let _ = vtd.start_recording(recorder);
    }
    let recorded_polls = policy.flush == rec.header.config.flush;
    let period = match policy.flush {
        FlushMode::Deferred { max_delay, .. } if !recorded_polls => Some(timer_period(max_delay)),
        _ => None,
    };
    let mut next_tick = period.unwrap_or_default();
    let mut out = Outcome::default();
    let run = |vtd: &mut Vtd<GuestMemoryMmap>, out: &mut Outcome, event: &Event| {
        let a = allocations();
        let start = Instant::now();
        execute(vtd, event, host);
        let took = start.elapsed();
        out.busy += took;
        if options.event_times {
            out.event_times.push(took);
        }
        out.allocations += allocations().wrapping_sub(a);
        out.events += 1;
        let f = vtd.footprint();
        if f.host_mappings > out.peak.host_mappings {
            out.peak.host_mappings = f.host_mappings;
            out.peak.deferred_mappings = f.deferred_mappings;
        }
        out.peak.snapshots = out.peak.snapshots.max(f.snapshots);
    };
    for step in &rec.steps {
        if let Some(p) = period {
            while next_tick <= step.time {
                // The VMM's timer fires whether or not anything is due; a poll that finds
                // nothing due does nothing (see Vtd::poll) and is neither made nor counted.
                clock.set(next_tick);
                if vtd.deferred_due() {
                    run(&mut vtd, &mut out, &Event::Poll);
                }
                // So the ticks before the first one that can find something due (the age
                // bound's, or none before the next event) are skipped, not stepped through: a
                // recording may hold days between two events (or, fuzzed, centuries).
                let wake = match vtd.next_deadline() {
                    Some(d) => next_tick.saturating_add(d),
                    None => step.time.saturating_add(Duration::from_nanos(1)),
                };
                let next = tick_at_or_after(next_tick, wake, p);
                if next == next_tick {
                    break; // the clock's end
                }
                next_tick = next;
            }
        }
        for change in &rec.memory[step.memory.clone()] {
            mem.write_slice(rec.change_bytes(change), GuestAddress(change.addr))
                .map_err(|_| ReplayError::Change(change.addr))?;
        }
        if step.event == Event::Poll && !recorded_polls {
            continue;
        }
        routes.expect(&rec.retranslations[step.retranslations.clone()]);
        clock.set(step.time);
        run(&mut vtd, &mut out, &step.event);
    }
    out.stats = vtd.stats();
    if let Some(summary) = vtd.finish_recording() {
        out.recording = Some(summary);
    }
    Ok(out)
}

fn execute(vtd: &mut Vtd<GuestMemoryMmap>, event: &Event, host: Host) {
    match *event {
        Event::Write { offset, len, value } => {
            let bytes = value.to_le_bytes();
            vtd.mmio_write(offset, &bytes[..usize::from(len).min(8)]);
        }
        Event::Poll => vtd.poll(),
        Event::FlushDeferred => vtd.flush_deferred(),
        Event::Attach(source) => {
            let dma: Box<dyn HostDma> = match host {
                Host::Type1 => Box::new(SharedHost::new(SimHost::new())),
                Host::Null => Box::new(NullHost),
            };
            // Refused the same way it was live: the event is the attempt.
            let _ = vtd.attach(source, dma);
        }
        Event::Detach(source) => vtd.detach(source),
        Event::Translate {
            source,
            pasid,
            iova,
            access,
        } => {
            let _ = vtd.translate_request(source, pasid, iova, access);
        }
        Event::RemapInterrupt { source, msg } => {
            let _ = vtd.remap_interrupt(source, msg);
        }
        Event::QueryInterrupt { source, msg } => {
            let _ = vtd.translate_interrupt(source, msg);
        }
        Event::TranslateRoute { source, msg } => {
            let _ = vtd.translate_route(source, msg);
        }
    }
}

/// How a replay's counters compare with those the live run closed its recording with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LiveMatch {
    /// Every counter is the same.
    Same,
    /// These counters differ: (name, live, replayed).
    Differ(Vec<(String, String, String)>),
    /// The recording has no live counters (the size cap stopped it) or they do not parse.
    Unknown,
}

/// Compares `stats` with the live counters `rec` ends with.
pub fn compare_with_live(rec: &Recording, stats: &Stats) -> LiveMatch {
    let Ending::End { stats: live, .. } = &rec.ending else {
        return LiveMatch::Unknown;
    };
    let (Ok(live), Ok(replayed)) = (
        serde_json::from_str::<serde_json::Value>(live),
        serde_json::to_value(stats),
    ) else {
        return LiveMatch::Unknown;
    };
    let mut differ = Vec::new();
    diff_values("", &live, &replayed, &mut differ);
    if differ.is_empty() {
        LiveMatch::Same
    } else {
        LiveMatch::Differ(differ)
    }
}

fn diff_values(
    path: &str,
    live: &serde_json::Value,
    replayed: &serde_json::Value,
    out: &mut Vec<(String, String, String)>,
) {
    match (live, replayed) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            // A counter the live run did not have yet (a field a later version added to
            // `Stats`) cannot be compared; one it had and the replay lacks still differs.
            let keys: std::collections::BTreeSet<&String> = a
                .keys()
                .chain(b.keys().filter(|k| a.is_empty() || a.contains_key(*k)))
                .collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                let null = serde_json::Value::Null;
                diff_values(
                    &p,
                    a.get(k).unwrap_or(&null),
                    b.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        (a, b) if a != b => out.push((path.to_string(), a.to_string(), b.to_string())),
        _ => {}
    }
}
