//! Writes a recording as the unit runs: each event as it starts, then what guest memory the
//! unit read while handling it, as changes since the unit last saw the same bytes.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use super::format::{self, Event, Header, Out, Small, SMALL_CHANGE, TAG_CAPPED, TAG_END};
use super::seen::Seen;
use super::stopwatch::{ticks, Stopwatch};
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
    /// Time spent recording (encoding, comparing what the unit read, writing), in ns: an
    /// estimate from the calls of a sample of the events (see `record/stopwatch.rs`).
    pub ns: u64,
    /// Reads that found bytes changed which the same event had already read: the guest changed
    /// memory while the unit was reading it. A replay sees the later bytes for the whole event.
    pub torn_reads: u64,
    /// The size cap stopped the recording.
    pub capped: bool,
    /// A write failed and stopped the recording.
    pub failed: bool,
}

/// Records are gathered in a buffer of this size and handed to the sink when it fills: most
/// submissions' records take a few dozen bytes, so a `write(2)` happens every few thousand.
/// Small enough to come from the heap, not a fresh mapping whose pages fault in one by one.
const BUFFER: usize = 64 << 10;

/// Whether the unit's reads and writes are recorded, and timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// No event yet (nothing to attach a change to: the bytes stay unknown, so the next read
    /// records them), or the recording stopped.
    Idle,
    /// Recorded; the current event is not among those timed.
    Untimed,
    /// Recorded, and the calls made while handling the current event are timed.
    Timed,
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
    seen: Seen,
    /// Spans written as changes during the current event, to tell torn reads.
    event_changes: Vec<(u64, u64)>,
    /// The changed spans of the read being recorded (kept to reuse its allocation).
    spans: Vec<(usize, usize)>,
    /// Records not yet handed to the sink.
    buffer: Vec<u8>,
    mode: Mode,
    stopped: bool,
    watch: Stopwatch,
}

impl Recorder {
    /// A recording into `sink` of at most `limit` bytes; `name` says which in messages. The
    /// recorder buffers what it writes: `sink` needs no buffer of its own.
    pub fn new(sink: Box<dyn Write + Send>, name: impl Into<String>, limit: u64) -> Self {
        Recorder {
            sink,
            name: name.into(),
            limit,
            summary: RecordSummary::default(),
            last_time: Duration::ZERO,
            seen: Seen::new(),
            event_changes: Vec::new(),
            spans: Vec::new(),
            buffer: Vec::with_capacity(BUFFER),
            mode: Mode::Idle,
            stopped: false,
            watch: Stopwatch::new(),
        }
    }

    /// A recording into a file created at `path` (replacing any), as the VMM makes them.
    pub fn create(path: &Path, limit: u64) -> std::io::Result<Self> {
        let file = std::fs::File::create(path)?;
        Ok(Recorder::new(
            Box::new(file),
            path.display().to_string(),
            limit,
        ))
    }

    pub fn summary(&self) -> RecordSummary {
        RecordSummary {
            ns: self.watch.ns(),
            ..self.summary
        }
    }

    /// Writes the header; `now` is the unit's clock, from which event times count.
    pub(crate) fn start(&mut self, header: &Header, now: Duration) {
        let t = ticks();
        self.last_time = now;
        self.put(|out| header.encode(out));
        self.watch.end_always(t);
    }

    /// Records `event`, which the unit starts handling at `now()` (read only when recording).
    pub(crate) fn event(&mut self, now: impl FnOnce() -> Duration, event: &Event) {
        if self.stopped {
            return;
        }
        let timed = self.watch.next_event();
        let t = timed.then(|| self.watch.begin_sampled());
        let now = now();
        let dt = now.saturating_sub(self.last_time);
        self.last_time = self.last_time.max(now);
        let dt = u64::try_from(dt.as_nanos()).unwrap_or(u64::MAX);
        let mut record = Small::new();
        format::encode_event(&mut record, dt, event);
        if self.put_small(&record) {
            self.summary.events += 1;
            self.mode = if timed { Mode::Timed } else { Mode::Untimed };
        }
        self.event_changes.clear();
        if let Some(t) = t {
            self.watch.end_sampled(t);
        }
    }

    /// The unit read `data` at `addr`: records the bytes that differ from what it last saw there.
    #[inline]
    pub(crate) fn read(&mut self, addr: u64, data: &[u8]) {
        match self.mode {
            Mode::Untimed => self.read_untimed(addr, data),
            Mode::Timed => self.read_timed(addr, data),
            Mode::Idle => {}
        }
    }

    #[cold]
    #[inline(never)]
    fn read_timed(&mut self, addr: u64, data: &[u8]) {
        let t = self.watch.begin_sampled();
        self.read_untimed(addr, data);
        self.watch.end_sampled(t);
    }

    #[inline(always)]
    fn read_untimed(&mut self, addr: u64, data: &[u8]) {
        let off = (addr % PAGE_SIZE) as usize;
        // Most reads: one table entry or one word of a descriptor, in a page already seen, and
        // unchanged.
        if let (Ok(new), true) = (<&[u8; 8]>::try_from(data), off <= PAGE_SIZE as usize - 8) {
            if let Some(page) = self.seen.get_mut(addr / PAGE_SIZE) {
                let mut old = [0u8; 8];
                old.copy_from_slice(&page[off..off + 8]);
                let diff = u64::from_le_bytes(old) ^ u64::from_le_bytes(*new);
                if diff != 0 {
                    page[off..off + 8].copy_from_slice(new);
                    self.word_changed(addr, u64::from_le_bytes(*new), diff);
                }
                return;
            }
        }
        self.read_bytes(addr, data);
    }

    /// The word `data` the unit read at `addr` differs from what it last saw in the bytes
    /// `diff` has set.
    #[inline(never)]
    fn word_changed(&mut self, addr: u64, data: u64, diff: u64) {
        // The bytes between the first and the last changed one are closer than MERGE_GAP: one
        // change, as read_in_page would make it.
        let first = diff.trailing_zeros() / 8;
        let last = 7 - diff.leading_zeros() / 8;
        let (addr, n) = (addr + u64::from(first), (last - first + 1) as usize);
        self.torn(addr, n);
        let mut record = Small::new();
        format::encode_memory_word(&mut record, addr, data >> (first * 8), n);
        if self.put_small(&record) {
            self.summary.memory_changes += 1;
        }
    }

    /// Counts a torn read if the `n` bytes at `addr` overlap a change of the same event, and
    /// notes them as one.
    #[inline]
    fn torn(&mut self, addr: u64, n: usize) {
        let span = (addr, addr + n as u64);
        if self
            .event_changes
            .iter()
            .any(|&(s, e)| s < span.1 && span.0 < e)
        {
            self.summary.torn_reads += 1;
        }
        self.event_changes.push(span);
    }

    #[inline(never)]
    fn read_bytes(&mut self, addr: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() && self.mode != Mode::Idle {
            let a = addr + done as u64;
            let off = (a % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - off).min(data.len() - done);
            self.read_in_page(a, off, &data[done..done + n]);
            done += n;
        }
    }

    fn read_in_page(&mut self, addr: u64, off: usize, data: &[u8]) {
        let end = off + data.len();
        let number = addr / PAGE_SIZE;
        let page = match self.seen.get_mut(number) {
            Some(page) if page[off..end] == *data => return,
            Some(page) => page,
            // A page never seen is zero: no need to keep one until something else is read.
            None if data.iter().all(|&b| b == 0) => return,
            None => {
                let t = ticks();
                let page = self.seen.get_or_insert(number);
                self.watch.end_always(t);
                page
            }
        };
        let mut spans = std::mem::take(&mut self.spans);
        spans.clear();
        changed_spans(&page[off..end], data, off, &mut spans);
        page[off..end].copy_from_slice(data);
        let base = addr - off as u64;
        for &(s, e) in &spans {
            self.change(base + s as u64, &data[s - off..e - off]);
        }
        self.spans = spans;
    }

    /// Records that the unit found `data` at `addr`, bytes it last saw otherwise.
    fn change(&mut self, addr: u64, data: &[u8]) {
        self.torn(addr, data.len());
        let written = if data.len() <= SMALL_CHANGE {
            let mut record = Small::new();
            format::encode_memory(&mut record, addr, data);
            self.put_small(&record)
        } else {
            self.put(|out| format::encode_memory(out, addr, data))
        };
        if written {
            self.summary.memory_changes += 1;
        }
    }

    /// The VMM's route holder re-translated `routes` while the unit handled the last event.
    pub(crate) fn retranslated(&mut self, routes: &[(SourceId, MsiMessage)]) {
        if self.mode == Mode::Idle {
            return;
        }
        let t = (self.mode == Mode::Timed).then(|| self.watch.begin_sampled());
        self.put(|out| format::encode_retranslation(out, routes));
        if let Some(t) = t {
            self.watch.end_sampled(t);
        }
    }

    /// The unit wrote `data` at `addr`: it knows those bytes now (a replay writes them too).
    #[inline]
    pub(crate) fn wrote(&mut self, addr: u64, data: &[u8]) {
        match self.mode {
            Mode::Untimed => self.wrote_untimed(addr, data),
            Mode::Timed => {
                let t = self.watch.begin_sampled();
                self.wrote_untimed(addr, data);
                self.watch.end_sampled(t);
            }
            Mode::Idle => {}
        }
    }

    fn wrote_untimed(&mut self, addr: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let a = addr + done as u64;
            let off = (a % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - off).min(data.len() - done);
            let number = a / PAGE_SIZE;
            let page = match self.seen.get_mut(number) {
                Some(page) => page,
                None => {
                    let t = ticks();
                    let page = self.seen.get_or_insert(number);
                    self.watch.end_always(t);
                    page
                }
            };
            page[off..off + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    /// Closes the recording with the unit's counters (`stats`, JSON) and flushes it.
    pub(crate) fn finish(&mut self, stats: &str) -> RecordSummary {
        let t = ticks();
        if !self.stopped {
            // The end record is written even past the cap: it is small and says how it ended.
            let start = self.buffer.len();
            self.buffer.push(TAG_END);
            self.buffer.varint(self.summary.torn_reads);
            self.buffer.varint(stats.len() as u64);
            self.buffer.extend_from_slice(stats.as_bytes());
            self.summary.bytes += (self.buffer.len() - start) as u64;
            self.stop();
        }
        self.spill();
        if let Err(e) = self.sink.flush() {
            self.fail(&e);
        }
        self.watch.end_always(t);
        self.summary()
    }

    /// Whether a record of `len` bytes stays under the cap; if not, the cap record is written
    /// and recording stops.
    #[inline]
    fn fits(&mut self, len: usize) -> bool {
        if self.summary.bytes + len as u64 + CAP_RESERVE > self.limit {
            self.cap();
            return false;
        }
        true
    }

    /// Appends `record` (see [`Self::put`]).
    #[inline]
    fn put_small(&mut self, record: &Small) -> bool {
        if self.stopped || !self.fits(record.len()) {
            return false;
        }
        // A constant-size copy, then the surplus dropped: no call to memcpy.
        let start = self.buffer.len();
        self.buffer.extend_from_slice(record.whole());
        self.buffer.truncate(start + record.len());
        self.accepted(record.len());
        true
    }

    /// Appends the record `encode` writes unless it would take the recording past its cap, in
    /// which case the cap record is written and recording stops. True when written.
    fn put(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> bool {
        if self.stopped {
            return false;
        }
        let start = self.buffer.len();
        encode(&mut self.buffer);
        let len = self.buffer.len() - start;
        if self.summary.bytes + len as u64 + CAP_RESERVE > self.limit {
            self.buffer.truncate(start);
            self.cap();
            return false;
        }
        self.accepted(len);
        true
    }

    /// A record of `len` bytes went into the buffer.
    #[inline]
    fn accepted(&mut self, len: usize) {
        self.summary.bytes += len as u64;
        if self.buffer.len() >= BUFFER {
            let t = ticks();
            self.spill();
            self.watch.end_always(t);
        }
    }
    #[cold]
    fn cap(&mut self) {
        let t = ticks();
        vm_device::warn_limited!(
            "VT-d recording {}: reached its size cap of {} bytes after {} events; the rest \
             of the run is not recorded (a replay stops there)",
            self.name,
            self.limit,
            self.summary.events
        );
        self.buffer.push(TAG_CAPPED);
        self.summary.bytes += 1;
        self.summary.capped = true;
        self.stop();
        self.spill();
        if let Err(e) = self.sink.flush() {
            self.fail(&e);
        }
        self.watch.end_always(t);
    }

    /// Hands the buffered records to the sink.
    fn spill(&mut self) {
        if self.buffer.is_empty() || self.summary.failed {
            return;
        }
        let result = self.sink.write_all(&self.buffer);
        self.buffer.clear();
        if let Err(e) = result {
            self.fail(&e);
        }
    }

    fn stop(&mut self) {
        self.stopped = true;
        self.mode = Mode::Idle;
        self.seen.clear();
        self.event_changes = Vec::new();
    }

    fn fail(&mut self, e: &std::io::Error) {
        if !self.summary.failed {
            vm_device::warn_limited!("VT-d recording {}: {e}; recording stopped", self.name);
        }
        self.summary.failed = true;
        self.buffer = Vec::new();
        self.stop();
    }
}

/// The 8 bytes of `chunk` as a little-endian word.
#[inline]
fn word(chunk: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(chunk);
    u64::from_le_bytes(w)
}

/// Appends to `spans` the spans of `new` that differ from `old` (as long), as offsets from
/// `base`, two spans closer than [`MERGE_GAP`] merged into one. Word by word: most words of a
/// table read are unchanged, and in a changed one the bytes between its first and last changed
/// byte merge anyway (the gap is under 8).
fn changed_spans(old: &[u8], new: &[u8], base: usize, spans: &mut Vec<(usize, usize)>) {
    let mut add = |start: usize, end: usize| match spans.last_mut() {
        Some(last) if start - last.1 < MERGE_GAP => last.1 = end,
        _ => spans.push((start, end)),
    };
    let (mut x, mut y) = (old.chunks_exact(8), new.chunks_exact(8));
    let mut at = base;
    for (p, q) in x.by_ref().zip(y.by_ref()) {
        let diff = word(p) ^ word(q);
        if diff != 0 {
            let first = (diff.trailing_zeros() / 8) as usize;
            let last = 7 - (diff.leading_zeros() / 8) as usize;
            add(at + first, at + last + 1);
        }
        at += 8;
    }
    for (i, (p, q)) in x.remainder().iter().zip(y.remainder()).enumerate() {
        if p != q {
            add(at + i, at + i + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The spans as the recorder first found them: byte by byte.
    fn spans_bytewise(old: &[u8], new: &[u8], base: usize) -> Vec<(usize, usize)> {
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for (i, (a, b)) in old.iter().zip(new).enumerate() {
            if a == b {
                continue;
            }
            let at = base + i;
            match spans.last_mut() {
                Some(last) if at - last.1 < MERGE_GAP => last.1 = at + 1,
                _ => spans.push((at, at + 1)),
            }
        }
        spans
    }

    proptest! {
        #[test]
        fn word_by_word_spans_are_the_byte_by_byte_ones(
            old in proptest::collection::vec(0u8..3, 0..80),
            flips in proptest::collection::vec(any::<bool>(), 80),
            base in 0usize..64,
        ) {
            // Few values and sparse flips: runs, gaps around MERGE_GAP, partial words.
            let new: Vec<u8> = old
                .iter()
                .zip(&flips)
                .map(|(&b, &flip)| if flip { b ^ 1 } else { b })
                .collect();
            let mut spans = Vec::new();
            changed_spans(&old, &new, base, &mut spans);
            prop_assert_eq!(spans, spans_bytewise(&old, &new, base));
        }
    }

    #[test]
    fn a_changed_word_is_one_change_of_the_bytes_between_its_first_and_last_changed_ones() {
        let buf = crate::record::tests::Buf::default();
        let mut r = Recorder::new(Box::new(buf.clone()), "x", u64::MAX);
        let header = Header {
            config: crate::VtdConfig::default(),
            regions: vec![(0, 1 << 20)],
        };
        r.start(&header, Duration::ZERO);
        r.event(|| Duration::ZERO, &Event::Poll);
        r.read(0x1000, &0x1122_3344_5566_7788u64.to_le_bytes());
        // Bytes 1 and 5 change: 1..=5 are written, as the byte-by-byte merge would.
        r.read(0x1000, &0x1122_0044_5566_0088u64.to_le_bytes());
        r.finish("{}");
        let rec = crate::record::Recording::parse(&buf.bytes()).unwrap();
        let changes: Vec<(u64, &[u8])> = rec
            .memory
            .iter()
            .map(|c| (c.addr, rec.change_bytes(c)))
            .collect();
        assert_eq!(
            changes,
            [
                (0x1000, &0x1122_3344_5566_7788u64.to_le_bytes()[..]),
                (0x1001, &[0x00, 0x66, 0x55, 0x44, 0x00][..]),
            ]
        );
    }
}
