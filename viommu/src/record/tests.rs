use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::descriptor::encode;
use crate::replay::{self, compare_with_live, Host, LiveMatch, Options, Policy};
use crate::testing::{mem, Driver, ManualClock, Mem, RecordingMsi, SharedHost, SimHost, Tables};
use crate::walk::PageTable;
use crate::{FlushMode, Perm, SourceId, Vtd, VtdConfig, PAGE_SIZE};

const P: u64 = PAGE_SIZE;
const DEV: SourceId = SourceId(0x0018);
const DOMAIN: u16 = 1;

/// A sink the test keeps a handle to.
#[derive(Clone, Default)]
pub(crate) struct Buf(Arc<Mutex<Vec<u8>>>);

impl Buf {
    pub(crate) fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A guest driving a recorded unit as Linux does, in caching mode.
struct Guest {
    mem: Mem,
    vtd: Vtd<Mem>,
    clock: ManualClock,
    drv: Driver,
    tables: Tables,
    pt: PageTable,
    token: u32,
    buf: Buf,
}

impl Guest {
    fn new(flush: FlushMode, limit: u64) -> Self {
        let mem = mem();
        let clock = ManualClock::default();
        let config = VtdConfig {
            flush,
            ..VtdConfig::default()
        };
        let mut vtd = Vtd::new(
            config,
            mem.clone(),
            Box::new(RecordingMsi::default()),
            Box::new(clock.clone()),
        )
        .unwrap();
        let buf = Buf::default();
        vtd.start_recording(Recorder::new(Box::new(buf.clone()), "test", limit))
            .unwrap();
        vtd.attach(DEV, Box::new(SharedHost::new(SimHost::new())))
            .unwrap();
        let mut drv = Driver::new();
        drv.queue_entries = 256;
        let mut tables = Tables::new(&mem);
        let pt = tables.context(DEV, DOMAIN, 4);
        drv.enable_qi(&mut vtd);
        drv.set_root(&mut vtd, tables.root);
        let mut g = Guest {
            mem,
            vtd,
            clock,
            drv,
            tables,
            pt,
            token: 0,
            buf,
        };
        g.sync(&[encode::context_global(), encode::iotlb_global()]);
        g.drv.set_translation(&mut g.vtd, true);
        g
    }

    fn sync(&mut self, descs: &[[u64; 2]]) {
        self.token += 1;
        self.clock.advance(Duration::from_micros(300));
        assert!(self
            .drv
            .submit_sync(&mut self.vtd, &self.mem, descs, self.token));
    }

    /// `n` I/Os at queue depth 1 over 4 IOVAs, `pages` pages each, the buffer moving every
    /// third I/O, with a timer poll now and then.
    fn io(&mut self, n: u64, pages: u64) {
        for i in 0..n {
            let iova = 0xffff_0000 - (i % 4) * 64 * P;
            let gpa = 0x20_0000 + (i / 8 % 5) * 64 * P;
            self.tables.map(self.pt, iova, gpa, pages * P, Perm::RW);
            let am = pages.trailing_zeros() as u8;
            self.sync(&[encode::iotlb_page(DOMAIN, iova, am, false)]);
            self.tables.unmap(self.pt, iova, pages * P);
            self.sync(&[encode::iotlb_page(DOMAIN, iova, am, false)]);
            // The VMM's timer polls only a deferred unit.
            if i % 7 == 0 && self.vtd.config().flush != FlushMode::Strict {
                self.clock.advance(Duration::from_millis(3));
                self.vtd.poll();
            }
        }
    }

    fn finish(mut self) -> (Vec<u8>, crate::Stats) {
        self.vtd.flush_deferred();
        let stats = self.vtd.stats();
        let summary = self.vtd.finish_recording().unwrap();
        let bytes = self.buf.bytes();
        assert_eq!(summary.bytes, bytes.len() as u64);
        (bytes, stats)
    }
}

fn no_allocations() -> u64 {
    0
}

/// `rec` replayed under `policy` over a type1 host.
fn replay_with(rec: &Recording, policy: &Policy) -> replay::Outcome {
    replay::replay(
        rec,
        policy,
        Host::Type1,
        Options::default(),
        &no_allocations,
    )
    .unwrap()
}

fn replay_as_recorded(rec: &Recording) -> replay::Outcome {
    let policy = Policy {
        name: "as-recorded".into(),
        strategy: rec.header.config.strategy,
        flush: rec.header.config.flush,
    };
    replay_with(rec, &policy)
}

#[test]
fn a_strict_recording_replays_to_exactly_the_live_counters() {
    let mut g = Guest::new(FlushMode::Strict, u64::MAX);
    g.io(40, 1);
    g.io(20, 8);
    let (bytes, live) = g.finish();
    let rec = Recording::parse(&bytes).unwrap();
    assert!(matches!(rec.ending, Ending::End { torn_reads: 0, .. }));
    let out = replay_as_recorded(&rec);
    assert_eq!(out.stats, live);
    assert_eq!(compare_with_live(&rec, &out.stats), LiveMatch::Same);
    assert!(live.host_unmap_calls >= 60 && live.descriptors > 200);
}

#[test]
fn a_deferred_recording_replays_to_its_live_counters_and_replays_are_deterministic() {
    let mut g = Guest::new(FlushMode::DEFERRED_DEFAULT, u64::MAX);
    g.io(60, 1);
    let (bytes, live) = g.finish();
    let rec = Recording::parse(&bytes).unwrap();
    assert!(rec.steps.iter().any(|s| s.event == Event::Poll));
    let a = replay_as_recorded(&rec);
    assert_eq!(a.stats, live);
    assert!(live.deferred_unmaps_cancelled > 0 && live.deferred_flushes > 0);
    let b = replay_as_recorded(&rec);
    assert_eq!(a.stats, b.stats);
    assert_eq!(a.events, b.events);
    // Other policies replay the same events.
    let run = |policy: &Policy| replay_with(&rec, policy);
    for policy in [Policy::per_leaf(), Policy::strict()] {
        let (x, y) = (run(&policy), run(&policy));
        assert_eq!(x.stats, y.stats, "{}", policy.name);
        assert_eq!(x.stats.descriptors, live.descriptors);
        assert_eq!(x.stats.deferred_unmaps, 0);
    }
}

#[test]
fn a_deferred_replay_skips_idle_timer_ticks_and_counts_as_if_it_stepped_them() {
    // Recorded strict (no polls in it), with a long idle gap between two bursts: a deferred
    // replay's timer ticks every millisecond or so through the gap. Stepping through 100 days of
    // ticks one by one would take hours; the replay skips the ticks that cannot find anything
    // due, and counts exactly as with a one-second gap.
    let record = |gap: Duration| {
        let mut g = Guest::new(FlushMode::Strict, u64::MAX);
        g.io(20, 1);
        g.clock.advance(gap);
        g.io(20, 1);
        let (bytes, _) = g.finish();
        Recording::parse(&bytes).unwrap()
    };
    let policy = Policy::deferred(4, Duration::from_millis(2));
    let run = |rec: &Recording| replay_with(rec, &policy);
    let short = run(&record(Duration::from_secs(1)));
    let long = run(&record(Duration::from_secs(100 * 24 * 3600)));
    assert_eq!(short.stats, long.stats);
    assert_eq!(short.events, long.events);
    assert!(long.stats.deferred_flushes > 0);
}

#[test]
fn timer_ticks_are_found_by_arithmetic_and_saturate_at_the_clocks_end() {
    let ms = Duration::from_millis;
    assert_eq!(replay::tick_at_or_after(ms(10), ms(10), ms(4)), ms(14));
    assert_eq!(replay::tick_at_or_after(ms(10), ms(13), ms(4)), ms(14));
    assert_eq!(replay::tick_at_or_after(ms(10), ms(14), ms(4)), ms(14));
    assert_eq!(replay::tick_at_or_after(ms(10), ms(15), ms(4)), ms(18));
    assert_eq!(
        replay::tick_at_or_after(Duration::MAX - ms(1), Duration::MAX, ms(4)),
        Duration::MAX
    );
    assert_eq!(
        replay::tick_at_or_after(Duration::MAX, Duration::MAX, ms(4)),
        Duration::MAX
    );
}

/// The VMM's routes: each re-translation goes through all of them.
struct VmmRoutes(Vec<(SourceId, vm_device::interrupt::MsiMessage)>);

impl crate::intremap::InterruptRoutes for VmmRoutes {
    fn retranslate(
        &mut self,
        _: crate::intremap::IecScope,
        translate: &mut crate::intremap::Translate<'_>,
    ) {
        for &(source, msg) in &self.0 {
            let _ = translate(source, msg);
        }
    }
}

#[test]
fn route_translations_and_re_translations_replay_to_the_live_counters() {
    use vm_device::interrupt::MsiMessage;
    use vm_memory::Bytes;
    const IRT: u64 = 30 << 20;
    let mem = mem();
    let config = VtdConfig {
        interrupt_remapping: true,
        x2apic: true,
        ..VtdConfig::default()
    };
    let mut vtd = Vtd::new(
        config,
        mem.clone(),
        Box::new(RecordingMsi::default()),
        Box::new(ManualClock::default()),
    )
    .unwrap();
    let buf = Buf::default();
    vtd.start_recording(Recorder::new(Box::new(buf.clone()), "test", u64::MAX))
        .unwrap();
    // Remappable messages for IRTE handles 0 and 1 (address bit 4, handle from bit 5).
    let routes = vec![
        (DEV, MsiMessage::new(0xfee0_0010, 0)),
        (DEV, MsiMessage::new(0xfee0_0030, 0)),
    ];
    vtd.set_interrupt_routes(Box::new(VmmRoutes(routes.clone())));
    // Present IRTEs (vector 0x40 + i, x2APIC destination i) that check DEV's requester id.
    let write_irtes = |vector_base: u64| {
        for i in 0..2u64 {
            let lo = 1 | (vector_base + i) << 16 | i << 32;
            let hi = 1 << 18 | u64::from(DEV.0);
            mem.write_obj(lo, vm_memory::GuestAddress(IRT + i * 16))
                .unwrap();
            mem.write_obj(hi, vm_memory::GuestAddress(IRT + i * 16 + 8))
                .unwrap();
        }
    };
    write_irtes(0x40);
    let mut drv = Driver::new();
    drv.enable_qi(&mut vtd);
    drv.set_interrupt_remapping(&mut vtd, IRT | crate::intremap::IRTA_EIME | 7, true);
    for &(source, msg) in &routes {
        assert!(vtd.translate_route(source, msg).is_ok());
    }
    // The guest moves both vectors and invalidates the interrupt-entry cache: the routes are
    // re-translated while the unit handles the submission.
    write_irtes(0x50);
    assert!(drv.submit_sync(&mut vtd, &mem, &[encode::interrupt_entry_cache(None)], 1));
    let live = vtd.stats();
    assert!(live.interrupts_remapped >= 6, "{live:?}");
    vtd.finish_recording().unwrap();
    let rec = Recording::parse(&buf.bytes()).unwrap();
    assert!(rec
        .steps
        .iter()
        .any(|s| matches!(s.event, Event::TranslateRoute { .. })));
    assert!(!rec.retranslations.is_empty());
    assert_eq!(replay_as_recorded(&rec).stats, live);
}

#[test]
fn a_timer_poll_is_recorded_only_when_it_finds_unmaps_due() {
    let mut g = Guest::new(FlushMode::DEFERRED_DEFAULT, u64::MAX);
    let events = |g: &Guest| g.vtd.recording().unwrap().events;
    let idle = events(&g);
    g.vtd.poll();
    assert_eq!(events(&g), idle, "nothing waits");
    let iova = 0xffff_0000;
    g.tables.map(g.pt, iova, 0x20_0000, P, Perm::RW);
    g.sync(&[encode::iotlb_page(DOMAIN, iova, 0, false)]);
    g.tables.unmap(g.pt, iova, P);
    g.sync(&[encode::iotlb_page(DOMAIN, iova, 0, false)]);
    assert_eq!(g.vtd.deferred_pending(), 1);
    let waiting = events(&g);
    g.vtd.poll();
    assert_eq!(events(&g), waiting, "not due yet");
    g.clock.advance(Duration::from_millis(10));
    g.vtd.poll();
    assert_eq!(events(&g), waiting + 1);
    assert_eq!(g.vtd.deferred_pending(), 0);
    let (bytes, live) = g.finish();
    let rec = Recording::parse(&bytes).unwrap();
    let polls = rec.steps.iter().filter(|s| s.event == Event::Poll).count();
    assert_eq!(polls, 1);
    assert_eq!(replay_as_recorded(&rec).stats, live);
}

#[test]
fn a_deferred_policy_with_other_bounds_gets_the_timer_polls_the_vmm_would_make() {
    let mut g = Guest::new(FlushMode::Strict, u64::MAX);
    g.io(60, 1);
    let (bytes, _) = g.finish();
    let rec = Recording::parse(&bytes).unwrap();
    assert!(!rec.steps.iter().any(|s| s.event == Event::Poll));
    let policy = Policy::deferred(1000, Duration::from_millis(1));
    let out = replay::replay(
        &rec,
        &policy,
        Host::Type1,
        Options::default(),
        &no_allocations,
    )
    .unwrap();
    // The run lasts well over a millisecond: the synthesized polls flushed what was deferred
    // before the final flush.
    assert!(out.stats.deferred_flushes > 1, "{:?}", out.stats);
    assert!(out.events > rec.steps.len() as u64);
}

#[test]
fn memory_is_recorded_as_changes_since_the_unit_last_saw_it() {
    let mut g = Guest::new(FlushMode::Strict, u64::MAX);
    g.io(4, 1);
    let before = g.vtd.recording().unwrap();
    // The same four I/Os again: the same PTEs change the same way, the queue slots are new
    // descriptors, but no table page is recorded whole again.
    g.io(4, 1);
    let after = g.vtd.recording().unwrap();
    let per_io = (after.bytes - before.bytes) / 4;
    assert!(per_io < 200, "{per_io} bytes per I/O");
    let (bytes, _) = g.finish();
    let rec = Recording::parse(&bytes).unwrap();
    // The first read of a page-table page records it; later ones only what changed.
    let largest_late = rec.memory[rec.memory.len() / 2..]
        .iter()
        .map(|c| c.len)
        .max()
        .unwrap();
    assert!(largest_late <= 32, "{largest_late}");
}

#[test]
fn the_size_cap_stops_the_recording_with_a_cap_record_that_replays() {
    let mut g = Guest::new(FlushMode::Strict, 4096);
    g.io(100, 1);
    let summary = g.vtd.recording().unwrap();
    assert!(summary.capped && summary.bytes <= 4096, "{summary:?}");
    let (bytes, live) = g.finish();
    assert_eq!(bytes.len() as u64, summary.bytes);
    let rec = Recording::parse(&bytes).unwrap();
    assert_eq!(rec.ending, Ending::Capped);
    let out = replay_as_recorded(&rec);
    assert!(out.stats.descriptors < live.descriptors);
    assert_eq!(compare_with_live(&rec, &out.stats), LiveMatch::Unknown);
}

#[test]
fn every_truncation_and_corruption_is_one_error_naming_an_offset_never_a_panic() {
    let mut g = Guest::new(FlushMode::Strict, u64::MAX);
    g.io(6, 2);
    let (bytes, _) = g.finish();
    for cut in 0..bytes.len() {
        let e = Recording::parse(&bytes[..cut]).unwrap_err();
        assert!(e.offset <= cut, "{cut}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("offset {}", e.offset)) && !msg.contains('\n'));
    }
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert_eq!(Recording::parse(&bad).unwrap_err().offset, 0);
    bad = bytes.clone();
    bad.push(0);
    let e = Recording::parse(&bad).unwrap_err();
    assert_eq!(
        (e.offset, e.expected),
        (bytes.len(), "the end of the file after the closing record")
    );
    // Flipping any byte gives a recording or an error, and a recording replays.
    for i in (0..bytes.len()).step_by(7) {
        let mut b = bytes.clone();
        b[i] ^= 0x5a;
        if let Ok(rec) = Recording::parse(&b) {
            let _ = replay::replay(
                &rec,
                &Policy::strict(),
                Host::Null,
                Options::default(),
                &no_allocations,
            );
        }
    }
}

#[test]
fn recording_starts_only_on_a_fresh_unit() {
    let mut g = Guest::new(FlushMode::Strict, u64::MAX);
    assert_eq!(
        g.vtd
            .start_recording(Recorder::new(Box::new(std::io::sink()), "x", 1 << 20)),
        Err(crate::RecordError::AlreadyRecording)
    );
    g.vtd.finish_recording();
    assert_eq!(
        g.vtd
            .start_recording(Recorder::new(Box::new(std::io::sink()), "x", 1 << 20)),
        Err(crate::RecordError::NotFresh)
    );
}

#[test]
fn a_read_that_sees_bytes_the_same_event_already_changed_counts_as_torn() {
    let mut r = Recorder::new(Box::new(std::io::sink()), "x", u64::MAX);
    r.event(|| Duration::ZERO, &Event::Poll);
    r.read(0x1000, &[1; 8]);
    r.read(0x1000, &[1; 8]);
    assert_eq!(r.summary().torn_reads, 0);
    r.read(0x1004, &[2; 4]);
    assert_eq!(r.summary().torn_reads, 1);
    r.event(|| Duration::ZERO, &Event::Poll);
    r.read(0x1000, &[3; 8]);
    assert_eq!(r.summary().torn_reads, 1, "a new event");
    assert_eq!(r.summary().memory_changes, 3);
    r.read(0x9000, &[0; 64]);
    assert_eq!(
        r.summary().memory_changes,
        3,
        "never-seen zeros are zeros in a replay"
    );
}

#[test]
fn events_round_trip_through_the_format() {
    let events = [
        Event::write(0x88, &0x1230u64.to_le_bytes()),
        Event::write(0x18, &0x8000_0000u32.to_le_bytes()),
        Event::Poll,
        Event::FlushDeferred,
        Event::Attach(SourceId(0x18)),
        Event::Detach(SourceId(0xffff)),
        Event::Translate {
            source: SourceId(8),
            pasid: Some(crate::PasidTag {
                pasid: 0xfffff,
                privileged: true,
            }),
            iova: 0xdead_b000,
            access: crate::Access::Write,
        },
        Event::Translate {
            source: SourceId(8),
            pasid: None,
            iova: 0,
            access: crate::Access::Read,
        },
        Event::RemapInterrupt {
            source: SourceId(9),
            msg: vm_device::interrupt::MsiMessage::new(0xfee0_0010, 0x4021),
        },
        Event::QueryInterrupt {
            source: SourceId(9),
            msg: vm_device::interrupt::MsiMessage::new(0xfee0_0000, 7),
        },
        Event::TranslateRoute {
            source: SourceId(0x20),
            msg: vm_device::interrupt::MsiMessage::new(0xfee0_0030, 0),
        },
    ];
    let routes = [
        (
            SourceId(0x20),
            vm_device::interrupt::MsiMessage::new(0xfee0_0010, 0),
        ),
        (
            SourceId(0xff00),
            vm_device::interrupt::MsiMessage::new(0xfee0_0050, 1),
        ),
    ];
    let buf = Buf::default();
    let mut r = Recorder::new(Box::new(buf.clone()), "x", u64::MAX);
    let header = Header {
        config: VtdConfig {
            interrupt_remapping: true,
            unverified_source: Some(SourceId(0xf0f8)),
            ..VtdConfig::default()
        },
        regions: vec![(0, 1 << 20), (1 << 32, 1 << 21)],
    };
    r.start(&header, Duration::from_secs(5));
    for (i, e) in events.iter().enumerate() {
        r.event(
            || Duration::from_secs(5) + Duration::from_micros(i as u64),
            e,
        );
    }
    r.retranslated(&routes);
    r.retranslated(&[]);
    r.finish("{}");
    let rec = Recording::parse(&buf.bytes()).unwrap();
    assert_eq!(rec.header, header);
    let got: Vec<Event> = rec.steps.iter().map(|s| s.event).collect();
    assert_eq!(got, events);
    let last = rec.steps.last().unwrap();
    assert_eq!(
        rec.retranslations[last.retranslations.clone()],
        [routes.to_vec(), Vec::new()],
        "re-translations belong to the event they happened in"
    );
    assert!(rec.steps[..events.len() - 1]
        .iter()
        .all(|s| s.retranslations.is_empty()));
    assert_eq!(rec.steps[3].time, Duration::from_micros(3));
}
