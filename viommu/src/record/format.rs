//! The recording file format (docs/recording.md describes it byte by byte): a header with the
//! unit's configuration and guest RAM layout, then one record per event and per change of
//! guest memory the unit read, ending with an end record (the live counters) or a cap record.
//! Integers are LEB128 varints unless said otherwise.

use std::time::Duration;

use crate::fault::{Access, PasidTag};
use crate::{FlushMode, SourceId, SyncStrategy, VtdConfig};
use vm_device::interrupt::MsiMessage;

/// The first 8 bytes of every recording.
pub const MAGIC: [u8; 8] = *b"VTDREC\r\n";
/// The format version this crate writes and reads.
pub const VERSION: u16 = 1;

// Record tags.
pub(crate) const TAG_WRITE: u8 = 0x01;
pub(crate) const TAG_POLL: u8 = 0x02;
pub(crate) const TAG_FLUSH: u8 = 0x03;
pub(crate) const TAG_ATTACH: u8 = 0x04;
pub(crate) const TAG_DETACH: u8 = 0x05;
pub(crate) const TAG_TRANSLATE: u8 = 0x06;
pub(crate) const TAG_REMAP_INTERRUPT: u8 = 0x07;
pub(crate) const TAG_QUERY_INTERRUPT: u8 = 0x08;
pub(crate) const TAG_TRANSLATE_ROUTE: u8 = 0x09;
pub(crate) const TAG_MEMORY: u8 = 0x10;
pub(crate) const TAG_RETRANSLATE: u8 = 0x11;
pub(crate) const TAG_CAPPED: u8 = 0x7e;
pub(crate) const TAG_END: u8 = 0x7f;

// Configuration flag bits (header).
const CFG_CACHING_MODE: u64 = 1 << 0;
const CFG_PASS_THROUGH: u64 = 1 << 1;
const CFG_INTERRUPT_REMAPPING: u64 = 1 << 2;
const CFG_X2APIC: u64 = 1 << 3;
const CFG_SCALABLE_MODE: u64 = 1 << 4;
const CFG_FIRST_STAGE: u64 = 1 << 5;
const CFG_DEFERRED: u64 = 1 << 6;
const CFG_PER_LEAF: u64 = 1 << 7;

/// Most bytes one register write record carries (an MMIO access is at most 8 bytes wide).
const MAX_WRITE_LEN: u64 = 8;
/// Most guest RAM regions a header may list.
const MAX_REGIONS: u64 = 64;

/// Something that changed the unit's state, other than guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A guest register write of `len` bytes (4 or 8 for a valid one; others are recorded as
    /// the unit saw them) at `offset`, little-endian `value`.
    Write {
        offset: u64,
        len: u8,
        value: u64,
    },
    /// The VMM's deferred-flush timer asked the unit to carry out due unmaps.
    Poll,
    /// The VMM carried out every deferred unmap (as it does when the VM stops).
    FlushDeferred,
    /// A device whose DMA the host remaps was put behind the unit.
    Attach(SourceId),
    Detach(SourceId),
    /// An emulated device's DMA request was translated.
    Translate {
        source: SourceId,
        pasid: Option<PasidTag>,
        iova: u64,
        access: Access,
    },
    /// An emulated device's interrupt request went through remapping.
    RemapInterrupt {
        source: SourceId,
        msg: MsiMessage,
    },
    /// A VMM asked what an interrupt request means (no state changes, but the IRTE was read).
    QueryInterrupt {
        source: SourceId,
        msg: MsiMessage,
    },
    /// A VMM translated an interrupt request for a route it sets up (counted as remapped).
    TranslateRoute {
        source: SourceId,
        msg: MsiMessage,
    },
}

impl Event {
    /// The register write of `data` at `offset`, as [`crate::Vtd::mmio_write`] takes it.
    pub fn write(offset: u64, data: &[u8]) -> Self {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        // The unit ignores a write wider than 8 bytes (no MMIO access is), as it does one of
        // none: it is recorded as one of none.
        let len = if data.len() <= 8 { data.len() as u8 } else { 0 };
        Event::Write {
            offset,
            len,
            value: u64::from_le_bytes(b),
        }
    }
}

/// What a recording says about the unit it was made on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub config: VtdConfig,
    /// Guest RAM regions as (start, length), as the unit's memory listed them.
    pub regions: Vec<(u64, u64)>,
}

/// Where records are encoded: a growing buffer, or a [`Small`] on the stack.
pub(crate) trait Out {
    fn byte(&mut self, b: u8);

    #[inline]
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.byte(b);
        }
    }

    /// Appends the low `n` (at most 8) bytes of `w`, little-endian.
    #[inline]
    fn word(&mut self, w: u64, n: usize) {
        self.bytes(&w.to_le_bytes()[..n.min(8)]);
    }

    /// Appends `v` as a LEB128 varint.
    #[inline]
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.byte(v as u8 | 0x80);
            v >>= 7;
        }
        self.byte(v as u8);
    }
}

impl Out for Vec<u8> {
    #[inline]
    fn byte(&mut self, b: u8) {
        self.push(b);
    }

    #[inline]
    fn bytes(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Appends `v` as a LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, v: u64) {
    out.varint(v);
}

/// Bytes of a [`Small`], a power of two: every event record fits (the longest, a translation,
/// takes a tag, four varints of at most 10 bytes and a byte: 42), and so does the change of at
/// most [`SMALL_CHANGE`] bytes (a tag, two varints, the bytes: 28).
pub(crate) const SMALL: usize = 64;
/// The most bytes of a change encoded as a [`Small`].
pub(crate) const SMALL_CHANGE: usize = 16;

/// A record encoded on the stack, to be copied into the recorder's buffer whole: cheaper than
/// growing the buffer a byte at a time.
pub(crate) struct Small {
    buf: [u8; SMALL],
    len: usize,
}

impl Small {
    #[inline]
    pub(crate) fn new() -> Self {
        Small {
            buf: [0; SMALL],
            len: 0,
        }
    }

    /// All [`SMALL`] bytes, of which the first [`Self::len`] are the record (the rest is zero
    /// or scratch).
    #[inline]
    pub(crate) fn whole(&self) -> &[u8; SMALL] {
        &self.buf
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

// Only records that fit are encoded into a Small (see SMALL): the masks below never wrap, they
// spare the bounds checks.
impl Out for Small {
    #[inline]
    fn byte(&mut self, b: u8) {
        self.buf[self.len & (SMALL - 1)] = b;
        self.len += 1;
    }

    /// One 8-byte store, of which the first `n` bytes count.
    #[inline]
    fn word(&mut self, w: u64, n: usize) {
        let at = self.len.min(SMALL - 8);
        self.buf[at..at + 8].copy_from_slice(&w.to_le_bytes());
        self.len += n.min(8);
    }
}

impl Header {
    /// The header as a recording starts with it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        let c = &self.config;
        let mut block = Vec::new();
        put_varint(&mut block, u64::from(c.aw_bits));
        let (deferred, max_pending, max_delay) = match c.flush {
            FlushMode::Strict => (0, 0, Duration::ZERO),
            FlushMode::Deferred {
                max_pending,
                max_delay,
            } => (CFG_DEFERRED, max_pending as u64, max_delay),
        };
        let flags = [
            (c.caching_mode, CFG_CACHING_MODE),
            (c.pass_through, CFG_PASS_THROUGH),
            (c.interrupt_remapping, CFG_INTERRUPT_REMAPPING),
            (c.x2apic, CFG_X2APIC),
            (c.scalable_mode, CFG_SCALABLE_MODE),
            (c.first_stage, CFG_FIRST_STAGE),
            (c.strategy == SyncStrategy::PerLeaf, CFG_PER_LEAF),
        ]
        .into_iter()
        .filter(|&(on, _)| on)
        .fold(deferred, |flags, (_, flag)| flags | flag);
        put_varint(&mut block, flags);
        put_varint(&mut block, c.fault_records as u64);
        put_varint(&mut block, max_pending);
        put_varint(&mut block, duration_ns(max_delay));
        put_varint(&mut block, c.walk_budget);
        // 0: every interrupt request source-validated; else 1 + the requester id that is not.
        put_varint(
            &mut block,
            c.unverified_source.map_or(0, |s| 1 + u64::from(s.0)),
        );
        put_varint(out, block.len() as u64);
        out.extend_from_slice(&block);
        put_varint(out, self.regions.len() as u64);
        for &(start, len) in &self.regions {
            put_varint(out, start);
            put_varint(out, len);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, ParseError> {
        let magic = r.bytes(MAGIC.len(), "the magic \"VTDREC\\r\\n\"")?;
        if magic != MAGIC {
            return Err(r.error_at(0, "the magic \"VTDREC\\r\\n\" (not a VT-d recording)"));
        }
        let at = r.pos;
        let v = r.bytes(2, "the format version")?;
        let version = u16::from_le_bytes([v[0], v[1]]);
        if version != VERSION {
            return Err(r.error_at(at, "format version 1"));
        }
        let len = r.varint("the configuration block's length")?;
        let block_start = r.pos;
        let block_end = block_start
            .checked_add(usize::try_from(len).unwrap_or(usize::MAX))
            .filter(|&e| e <= r.data.len())
            .ok_or_else(|| r.error_at(block_start, "a configuration block within the file"))?;
        let at = r.pos;
        let aw_bits = r.varint("the address width")?;
        if aw_bits != 39 && aw_bits != 48 {
            return Err(r.error_at(at, "an address width of 39 or 48"));
        }
        let flags = r.varint("the configuration flags")?;
        let at = r.pos;
        let fault_records = r.varint("the number of fault records")?;
        if fault_records == 0 || fault_records > crate::regs::MAX_FAULT_RECORDS as u64 {
            return Err(r.error_at(at, "1 to 8 fault records"));
        }
        let max_pending = r.varint("the deferred-flush count bound")?;
        let max_delay = r.varint("the deferred-flush delay bound (ns)")?;
        let walk_budget = r.varint("the walk budget")?;
        // Appended after the first recordings were made: absent in theirs (none).
        let unverified_source = if r.pos < block_end {
            let at = r.pos;
            match r.varint("the requester id exempt from source validation")? {
                0 => None,
                v => Some(SourceId(
                    u16::try_from(v - 1).map_err(|_| r.error_at(at, "a 16-bit requester id"))?,
                )),
            }
        } else {
            None
        };
        if r.pos > block_end {
            return Err(r.error_at(block_start, "a configuration block holding its fields"));
        }
        // Fields a later version appends are skipped.
        r.pos = block_end;
        let flush = if flags & CFG_DEFERRED != 0 {
            FlushMode::Deferred {
                max_pending: usize::try_from(max_pending).unwrap_or(usize::MAX),
                max_delay: Duration::from_nanos(max_delay),
            }
        } else {
            FlushMode::Strict
        };
        let config = VtdConfig {
            aw_bits: aw_bits as u32,
            caching_mode: flags & CFG_CACHING_MODE != 0,
            pass_through: flags & CFG_PASS_THROUGH != 0,
            fault_records: fault_records as usize,
            flush,
            strategy: if flags & CFG_PER_LEAF != 0 {
                SyncStrategy::PerLeaf
            } else {
                SyncStrategy::Batched
            },
            walk_budget,
            interrupt_remapping: flags & CFG_INTERRUPT_REMAPPING != 0,
            x2apic: flags & CFG_X2APIC != 0,
            scalable_mode: flags & CFG_SCALABLE_MODE != 0,
            first_stage: flags & CFG_FIRST_STAGE != 0,
            unverified_source,
            // Not in the header: a replay runs with the default caches, no checker and no
            // device-TLBs (what every recording so far was made with).
            ..VtdConfig::default()
        };
        let at = r.pos;
        let count = r.varint("the number of RAM regions")?;
        if count > MAX_REGIONS {
            return Err(r.error_at(at, "at most 64 RAM regions"));
        }
        let mut regions = Vec::with_capacity(count as usize);
        let mut prev_end = 0;
        for _ in 0..count {
            let at = r.pos;
            let start = r.varint("a RAM region's start")?;
            let len = r.varint("a RAM region's length")?;
            let end = start
                .checked_add(len)
                .filter(|_| len > 0 && start >= prev_end);
            let Some(end) = end else {
                return Err(r.error_at(at, "a non-empty RAM region above the previous one"));
            };
            if start % crate::PAGE_SIZE != 0 || len % crate::PAGE_SIZE != 0 {
                return Err(r.error_at(at, "a page-aligned RAM region"));
            }
            prev_end = end;
            regions.push((start, len));
        }
        Ok(Header { config, regions })
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Encodes `event`, `dt_ns` after the previous one, as one record.
#[inline]
pub(crate) fn encode_event(out: &mut impl Out, dt_ns: u64, event: &Event) {
    fn source(out: &mut impl Out, s: SourceId) {
        out.varint(u64::from(s.0));
    }
    match *event {
        Event::Write { offset, len, value } => {
            out.byte(TAG_WRITE);
            out.varint(dt_ns);
            out.varint(offset);
            out.byte(len);
            out.word(value, usize::from(len));
        }
        Event::Poll => {
            out.byte(TAG_POLL);
            out.varint(dt_ns);
        }
        Event::FlushDeferred => {
            out.byte(TAG_FLUSH);
            out.varint(dt_ns);
        }
        Event::Attach(s) => {
            out.byte(TAG_ATTACH);
            out.varint(dt_ns);
            source(out, s);
        }
        Event::Detach(s) => {
            out.byte(TAG_DETACH);
            out.varint(dt_ns);
            source(out, s);
        }
        Event::Translate {
            source: s,
            pasid,
            iova,
            access,
        } => {
            out.byte(TAG_TRANSLATE);
            out.varint(dt_ns);
            source(out, s);
            // 0: no PASID; otherwise 1 + (PASID << 1 | privileged).
            let p = pasid.map_or(0, |p| {
                1 + (u64::from(p.pasid) << 1 | u64::from(p.privileged))
            });
            out.varint(p);
            out.varint(iova);
            out.byte(u8::from(access == Access::Write));
        }
        Event::RemapInterrupt { source: s, msg }
        | Event::QueryInterrupt { source: s, msg }
        | Event::TranslateRoute { source: s, msg } => {
            let tag = match event {
                Event::RemapInterrupt { .. } => TAG_REMAP_INTERRUPT,
                Event::QueryInterrupt { .. } => TAG_QUERY_INTERRUPT,
                _ => TAG_TRANSLATE_ROUTE,
            };
            out.byte(tag);
            out.varint(dt_ns);
            source(out, s);
            out.varint(msg.address);
            out.varint(u64::from(msg.data));
        }
    }
}

/// Encodes the routes a VMM's route holder re-translated in one call (during the last event).
pub(crate) fn encode_retranslation(out: &mut Vec<u8>, routes: &[(SourceId, MsiMessage)]) {
    out.push(TAG_RETRANSLATE);
    put_varint(out, routes.len() as u64);
    for (source, msg) in routes {
        put_varint(out, u64::from(source.0));
        put_varint(out, msg.address);
        put_varint(out, u64::from(msg.data));
    }
}

/// Encodes a change of guest memory: `data` at `addr`.
#[inline]
pub(crate) fn encode_memory(out: &mut impl Out, addr: u64, data: &[u8]) {
    out.byte(TAG_MEMORY);
    out.varint(addr);
    out.varint(data.len() as u64);
    out.bytes(data);
}

/// Encodes a change of guest memory: the low `n` (at most 8) bytes of `w` at `addr`.
#[inline]
pub(crate) fn encode_memory_word(out: &mut impl Out, addr: u64, w: u64, n: usize) {
    out.byte(TAG_MEMORY);
    out.varint(addr);
    out.varint(n.min(8) as u64);
    out.word(w, n);
}

/// A recording that cannot be read: where, and what was expected there.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("recording is corrupt or truncated at byte offset {offset}: expected {expected}")]
pub struct ParseError {
    pub offset: usize,
    pub expected: &'static str,
}

/// One event of a recording, with the guest memory the unit read while handling it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// When it happened, from the start of the recording, as the unit's clock said.
    pub time: Duration,
    pub event: Event,
    /// Its changes of guest memory: indexes into [`Recording::memory`].
    pub memory: std::ops::Range<usize>,
    /// The route holder's re-translations during it: indexes into
    /// [`Recording::retranslations`].
    pub retranslations: std::ops::Range<usize>,
}

/// A change of guest memory: `len` bytes at `addr`, stored at `offset` of
/// [`Recording::bytes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub addr: u64,
    pub offset: usize,
    pub len: usize,
}

/// How a recording ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The VMM finished it: the unit's counters at that moment, as JSON (the same object as
    /// the VMM's `--stats-json`), and how many reads saw a location change twice in one event.
    End { stats: String, torn_reads: u64 },
    /// The size cap stopped it: what followed was not recorded.
    Capped,
}

/// A parsed recording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recording {
    pub header: Header,
    pub steps: Vec<Step>,
    pub memory: Vec<Change>,
    /// The bytes of every change, back to back.
    pub bytes: Vec<u8>,
    /// Each call of the VMM's route holder: the routes it re-translated, in order.
    pub retranslations: Vec<Vec<(SourceId, MsiMessage)>>,
    pub ending: Ending,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn error_at(&self, offset: usize, expected: &'static str) -> ParseError {
        ParseError { offset, expected }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ParseError> {
        let b = *self
            .data
            .get(self.pos)
            .ok_or(self.error_at(self.pos, what))?;
        self.pos += 1;
        Ok(b)
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ParseError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(self.error_at(self.pos, what))?;
        let b = &self.data[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, ParseError> {
        let start = self.pos;
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8(what)?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(self.error_at(start, "a varint of at most 64 bits"));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.error_at(start, "a varint of at most 10 bytes"))
    }

    fn source(&mut self) -> Result<SourceId, ParseError> {
        let at = self.pos;
        let s = self.varint("a source id")?;
        u16::try_from(s)
            .map(SourceId)
            .map_err(|_| self.error_at(at, "a 16-bit source id"))
    }

    fn msi(&mut self) -> Result<MsiMessage, ParseError> {
        let addr = self.varint("an interrupt message's address")?;
        let at = self.pos;
        let data = self.varint("an interrupt message's data")?;
        let data = u32::try_from(data).map_err(|_| self.error_at(at, "32-bit interrupt data"))?;
        Ok(MsiMessage::new(addr, data))
    }
}

impl Recording {
    /// Parses a whole recording (uncompressed). Never panics: a corrupt or truncated one gives
    /// the offset and what was expected there.
    pub fn parse(data: &[u8]) -> Result<Recording, ParseError> {
        let mut r = Reader { data, pos: 0 };
        let header = Header::decode(&mut r)?;
        let mut steps: Vec<Step> = Vec::new();
        let mut memory = Vec::new();
        let mut bytes = Vec::new();
        let mut retranslations = Vec::new();
        let mut time = Duration::ZERO;
        let ending = loop {
            let at = r.pos;
            let tag = r.u8("a record tag, or the end or cap record that closes a recording")?;
            if tag == TAG_MEMORY {
                let addr = r.varint("a memory change's address")?;
                let len_at = r.pos;
                let len = r.varint("a memory change's length")?;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                let data = r.bytes(len, "the bytes of a memory change")?;
                let inside = addr.checked_add(len as u64).is_some_and(|end| {
                    header
                        .regions
                        .iter()
                        .any(|&(s, l)| addr >= s && end <= s + l)
                });
                if len == 0 || !inside {
                    return Err(r.error_at(len_at, "a memory change inside one RAM region"));
                }
                let Some(step) = steps.last_mut() else {
                    return Err(r.error_at(at, "an event before the first memory change"));
                };
                memory.push(Change {
                    addr,
                    offset: bytes.len(),
                    len,
                });
                bytes.extend_from_slice(data);
                step.memory.end = memory.len();
                continue;
            }
            if tag == TAG_RETRANSLATE {
                let count = r.varint("the count of re-translated routes")?;
                let mut routes = Vec::new();
                for _ in 0..count {
                    routes.push((r.source()?, r.msi()?));
                }
                let Some(step) = steps.last_mut() else {
                    return Err(r.error_at(at, "an event before the first route re-translation"));
                };
                retranslations.push(routes);
                step.retranslations.end = retranslations.len();
                continue;
            }
            if tag == TAG_CAPPED {
                break Ending::Capped;
            }
            if tag == TAG_END {
                let torn_reads = r.varint("the count of torn reads")?;
                let len = r.varint("the length of the counters")?;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                let at = r.pos;
                let text = r.bytes(len, "the counters as JSON")?;
                let stats = std::str::from_utf8(text)
                    .map_err(|_| r.error_at(at, "counters as UTF-8 JSON"))?
                    .to_string();
                break Ending::End { stats, torn_reads };
            }
            let dt = r.varint("the time since the previous event (ns)")?;
            time = time.saturating_add(Duration::from_nanos(dt));
            let event = match tag {
                TAG_WRITE => {
                    let offset = r.varint("a register offset")?;
                    let len_at = r.pos;
                    let len = r.u8("a register write's width")?;
                    if u64::from(len) > MAX_WRITE_LEN {
                        return Err(r.error_at(len_at, "a register write of at most 8 bytes"));
                    }
                    let data = r.bytes(usize::from(len), "a register write's bytes")?;
                    Event::write(offset, data)
                }
                TAG_POLL => Event::Poll,
                TAG_FLUSH => Event::FlushDeferred,
                TAG_ATTACH => Event::Attach(r.source()?),
                TAG_DETACH => Event::Detach(r.source()?),
                TAG_TRANSLATE => {
                    let source = r.source()?;
                    let at = r.pos;
                    let p = r.varint("a request's PASID")?;
                    let pasid = match p {
                        0 => None,
                        p => {
                            let pasid = u32::try_from((p - 1) >> 1)
                                .map_err(|_| r.error_at(at, "a 32-bit PASID"))?;
                            Some(PasidTag {
                                pasid,
                                privileged: (p - 1) & 1 != 0,
                            })
                        }
                    };
                    let iova = r.varint("a request's address")?;
                    let at = r.pos;
                    let access = match r.u8("a request's access")? {
                        0 => Access::Read,
                        1 => Access::Write,
                        _ => return Err(r.error_at(at, "access 0 (read) or 1 (write)")),
                    };
                    Event::Translate {
                        source,
                        pasid,
                        iova,
                        access,
                    }
                }
                TAG_REMAP_INTERRUPT => Event::RemapInterrupt {
                    source: r.source()?,
                    msg: r.msi()?,
                },
                TAG_QUERY_INTERRUPT => Event::QueryInterrupt {
                    source: r.source()?,
                    msg: r.msi()?,
                },
                TAG_TRANSLATE_ROUTE => Event::TranslateRoute {
                    source: r.source()?,
                    msg: r.msi()?,
                },
                _ => return Err(r.error_at(at, "a known record tag")),
            };
            steps.push(Step {
                time,
                event,
                memory: memory.len()..memory.len(),
                retranslations: retranslations.len()..retranslations.len(),
            });
        };
        if r.pos != data.len() {
            return Err(r.error_at(r.pos, "the end of the file after the closing record"));
        }
        Ok(Recording {
            header,
            steps,
            memory,
            bytes,
            retranslations,
            ending,
        })
    }

    /// The bytes of `change`.
    pub fn change_bytes(&self, change: &Change) -> &[u8] {
        &self.bytes[change.offset..change.offset + change.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{Access, PasidTag};

    #[test]
    fn the_longest_records_fit_in_a_small_one_and_encode_as_in_a_vec() {
        let msg = MsiMessage::new(u64::MAX, u32::MAX);
        let source = SourceId(u16::MAX);
        let events = [
            Event::Write {
                offset: u64::MAX,
                len: 8,
                value: u64::MAX,
            },
            Event::Translate {
                source,
                pasid: Some(PasidTag {
                    pasid: u32::MAX,
                    privileged: true,
                }),
                iova: u64::MAX,
                access: Access::Write,
            },
            Event::RemapInterrupt { source, msg },
            Event::QueryInterrupt { source, msg },
            Event::TranslateRoute { source, msg },
            Event::Attach(source),
            Event::Poll,
        ];
        for e in &events {
            let (mut small, mut vec) = (Small::new(), Vec::new());
            encode_event(&mut small, u64::MAX, e);
            encode_event(&mut vec, u64::MAX, e);
            assert!(small.len() <= SMALL, "{e:?}: {} bytes", small.len());
            assert_eq!(&small.whole()[..small.len()], &vec[..], "{e:?}");
        }
        let data = [0xa5; SMALL_CHANGE];
        let (mut small, mut vec) = (Small::new(), Vec::new());
        encode_memory(&mut small, u64::MAX, &data);
        encode_memory(&mut vec, u64::MAX, &data);
        assert_eq!(&small.whole()[..small.len()], &vec[..]);
        for n in 1..=8 {
            let (mut small, mut vec) = (Small::new(), Vec::new());
            encode_memory_word(&mut small, u64::MAX, 0x0102_0304_0506_0708, n);
            encode_memory(
                &mut vec,
                u64::MAX,
                &0x0102_0304_0506_0708u64.to_le_bytes()[..n],
            );
            assert_eq!(&small.whole()[..small.len()], &vec[..], "{n} bytes");
        }
    }
}
