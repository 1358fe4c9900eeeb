//! Writes a recording as the unit runs: each event as it starts, then what guest memory the
//! unit read while handling it, as changes since the unit last saw the same bytes.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use super::format::{self, Event, Header, TAG_CAPPED, TAG_END};
use crate::{SourceId, PAGE_SIZE};
use vm_device::interrupt::MsiMessage;

/// Bytes kept free below the cap for the record that says the cap was reached.
const CAP_RESERVE: u64 = 16;
/// Two changed spans of one read closer than this are written as one change.
const MERGE_GAP: usize = 16;

/// What a recording has cost and holds so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecordSummary {
    /// Events recorded.
    pub events: u64,
    /// Changes of guest memory recorded.
    pub memory_changes: u64,
    /// Bytes written, header included.
    pub bytes: u64,
    /// Time spent recording (encoding, comparing what the unit read, writing), in ns.
    pub ns: u64,
    /// Reads that found bytes changed which the same event had already read: the guest changed
    /// memory while the unit was reading it. A replay sees the later bytes for the whole event.
    pub torn_reads: u64,
    /// The size cap stopped the recording.
    pub capped: bool,
    /// A write failed and stopped the recording.
    pub failed: bool,
}

/// Guest memory as the unit last saw it, one page. Bytes it never saw count as zero: a replay
/// starts from zeroed memory, so a zero the unit reads for the first time needs no record.
type SeenPage = [u8; PAGE_SIZE as usize];

/// A cheap timestamp for charging the recorder's own time: the TSC where there is one. Reading
/// the system clock twice per guest-memory read cost more than the recording itself in the
/// nested testbed (its L1 has no usable vDSO clock under TCG); ticks are turned into ns with
/// the rate measured over the whole recording.
fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC reads a counter; it has no memory effects and every x86_64 CPU has it.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        use std::sync::OnceLock;
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A recording being written.
pub struct Recorder {
    sink: Box<dyn Write + Send>,
    /// Names the recording in messages (its path).
    name: String,
    limit: u64,
    summary: RecordSummary,
    /// The unit's clock at the previous event.
    last_time: Duration,
    seen: HashMap<u64, Box<SeenPage>>,
    /// Spans written as changes during the current event, to tell torn reads.
    event_changes: Vec<(u64, u64)>,
    scratch: Vec<u8>,
    stopped: bool,
    /// When the recorder was made, by the clock and in ticks, to convert ticks into ns.
    born: (Instant, u64),
    /// Ticks spent recording.
    busy_ticks: u64,
}

impl Recorder {
    /// A recording into `sink` of at most `limit` bytes; `name` says which in messages.
    pub fn new(sink: Box<dyn Write + Send>, name: impl Into<String>, limit: u64) -> Self {
        Recorder {
            sink,
            name: name.into(),
            limit,
            summary: RecordSummary::default(),
            last_time: Duration::ZERO,
            seen: HashMap::new(),
            event_changes: Vec::new(),
            scratch: Vec::with_capacity(256),
            stopped: false,
            born: (Instant::now(), ticks()),
            busy_ticks: 0,
        }
    }

    pub fn summary(&self) -> RecordSummary {
        let elapsed_ns = self.born.0.elapsed().as_nanos();
        let elapsed_ticks = u128::from(ticks().wrapping_sub(self.born.1));
        let ns = (u128::from(self.busy_ticks) * elapsed_ns)
            .checked_div(elapsed_ticks)
            .unwrap_or(0);
        RecordSummary {
            ns: u64::try_from(ns).unwrap_or(u64::MAX),
            ..self.summary
        }
    }

    /// Writes the header; `now` is the unit's clock, from which event times count.
    pub(crate) fn start(&mut self, header: &Header, now: Duration) {
        let t = ticks();
        self.last_time = now;
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        header.encode(&mut out);
        self.emit(&out);
        self.scratch = out;
        self.charge(t);
    }

    /// Records `event`, which the unit starts handling at `now`.
    pub(crate) fn event(&mut self, now: Duration, event: &Event) {
        if self.stopped {
            return;
        }
        let t = ticks();
        let dt = now.saturating_sub(self.last_time);
        self.last_time = self.last_time.max(now);
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        format::encode_event(
            &mut out,
            u64::try_from(dt.as_nanos()).unwrap_or(u64::MAX),
            event,
        );
        if self.emit(&out) {
            self.summary.events += 1;
        }
        self.scratch = out;
        self.event_changes.clear();
        self.charge(t);
    }

    /// The unit read `data` at `addr`: records the bytes that differ from what it last saw there.
    pub(crate) fn read(&mut self, addr: u64, data: &[u8]) {
        // Before the first event there is nothing to attach a change to: leave the bytes
        // unknown, so the next read records them.
        if self.stopped || self.summary.events == 0 {
            return;
        }
        let t = ticks();
        let mut done = 0;
        while done < data.len() {
            let a = addr + done as u64;
            let off = (a % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - off).min(data.len() - done);
            self.read_in_page(a, off, &data[done..done + n]);
            done += n;
        }
        self.charge(t);
    }

    fn read_in_page(&mut self, addr: u64, off: usize, data: &[u8]) {
        let end = off + data.len();
        let page = match self.seen.get_mut(&(addr / PAGE_SIZE)) {
            Some(page) if page[off..end] == *data => return,
            Some(page) => page,
            // A page never seen is zero: no need to keep one until something else is read.
            None if data.iter().all(|&b| b == 0) => return,
            None => self
                .seen
                .entry(addr / PAGE_SIZE)
                .or_insert_with(|| Box::new([0; PAGE_SIZE as usize])),
        };
        // The spans that changed, merged across small gaps.
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for (i, &b) in data.iter().enumerate() {
            let at = off + i;
            if page[at] == b {
                continue;
            }
            match spans.last_mut() {
                Some(last) if at - last.1 < MERGE_GAP => last.1 = at + 1,
                _ => spans.push((at, at + 1)),
            }
        }
        page[off..end].copy_from_slice(data);
        let base = addr - off as u64;
        for (s, e) in spans {
            let span = (base + s as u64, base + e as u64);
            if self
                .event_changes
                .iter()
                .any(|&(cs, ce)| cs < span.1 && span.0 < ce)
            {
                self.summary.torn_reads += 1;
            }
            self.event_changes.push(span);
            let mut out = std::mem::take(&mut self.scratch);
            out.clear();
            format::encode_memory(&mut out, span.0, &data[s - off..e - off]);
            if self.emit(&out) {
                self.summary.memory_changes += 1;
            }
            self.scratch = out;
        }
    }

    /// The VMM's route holder re-translated `routes` while the unit handled the last event.
    pub(crate) fn retranslated(&mut self, routes: &[(SourceId, MsiMessage)]) {
        if self.stopped || self.summary.events == 0 {
            return;
        }
        let t = ticks();
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        format::encode_retranslation(&mut out, routes);
        self.emit(&out);
        self.scratch = out;
        self.charge(t);
    }

    /// The unit wrote `data` at `addr`: it knows those bytes now (a replay writes them too).
    pub(crate) fn wrote(&mut self, addr: u64, data: &[u8]) {
        if self.stopped || self.summary.events == 0 {
            return;
        }
        let mut done = 0;
        while done < data.len() {
            let a = addr + done as u64;
            let off = (a % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - off).min(data.len() - done);
            self.seen
                .entry(a / PAGE_SIZE)
                .or_insert_with(|| Box::new([0; PAGE_SIZE as usize]))[off..off + n]
                .copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    /// Closes the recording with the unit's counters (`stats`, JSON) and flushes it.
    pub(crate) fn finish(&mut self, stats: &str) -> RecordSummary {
        if !self.stopped {
            let t = ticks();
            let mut out = vec![TAG_END];
            format::put_varint(&mut out, self.summary.torn_reads);
            format::put_varint(&mut out, stats.len() as u64);
            out.extend_from_slice(stats.as_bytes());
            // The end record is written even past the cap: it is small and says how it ended.
            self.write_raw(&out);
            self.stopped = true;
            self.charge(t);
        }
        if let Err(e) = self.sink.flush() {
            self.fail(&e);
        }
        self.seen = HashMap::new();
        self.summary()
    }

    /// Writes `record` unless it would take the recording past its cap, in which case the cap
    /// record is written and recording stops. True when written.
    fn emit(&mut self, record: &[u8]) -> bool {
        if self.stopped {
            return false;
        }
        if self.summary.bytes + record.len() as u64 + CAP_RESERVE > self.limit {
            vm_device::warn_limited!(
                "VT-d recording {}: reached its size cap of {} bytes after {} events; the rest \
                 of the run is not recorded (a replay stops there)",
                self.name,
                self.limit,
                self.summary.events
            );
            self.write_raw(&[TAG_CAPPED]);
            self.summary.capped = true;
            self.stopped = true;
            self.seen = HashMap::new();
            if let Err(e) = self.sink.flush() {
                self.fail(&e);
            }
            return false;
        }
        self.write_raw(record)
    }

    fn write_raw(&mut self, bytes: &[u8]) -> bool {
        match self.sink.write_all(bytes) {
            Ok(()) => {
                self.summary.bytes += bytes.len() as u64;
                true
            }
            Err(e) => {
                self.fail(&e);
                false
            }
        }
    }

    fn fail(&mut self, e: &std::io::Error) {
        if !self.summary.failed {
            vm_device::warn_limited!("VT-d recording {}: {e}; recording stopped", self.name);
        }
        self.summary.failed = true;
        self.stopped = true;
        self.seen = HashMap::new();
    }

    fn charge(&mut self, since: u64) {
        self.busy_ticks += ticks().wrapping_sub(since);
    }
}
