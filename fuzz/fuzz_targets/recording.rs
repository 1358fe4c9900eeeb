//! The recording parser (`viommu::record::Recording::parse`, what `vmm replay` reads) over
//! arbitrary bytes: never a panic; an error names an offset inside the input; a recording that
//! parses is consistent (every memory change inside a recorded RAM region and attached to an
//! event, in order) and replays under each policy without a panic. Input that does not start
//! with the magic gets a valid header put in front, so the fuzzer spends its time on records.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use viommu::record::{Header, Recording, MAGIC};
use viommu::replay::{replay, Host, Options, Policy};
use viommu::VtdConfig;

/// Replays only what stays small: guest RAM the replay must lay out, and events.
const MAX_REPLAY_RAM: u64 = 64 << 20;
const MAX_REPLAY_STEPS: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let input = if data.starts_with(&MAGIC) {
        data.to_vec()
    } else {
        let header = Header {
            config: VtdConfig::default(),
            regions: vec![(0, 8 << 20)],
        };
        let mut v = header.to_bytes();
        v.extend_from_slice(data);
        v
    };
    let rec = match Recording::parse(&input) {
        Ok(rec) => rec,
        Err(e) => {
            assert!(e.offset <= input.len(), "{e}");
            return;
        }
    };
    let mut next = 0;
    for step in &rec.steps {
        assert_eq!(step.memory.start, next, "changes attached in order");
        assert!(step.memory.end <= rec.memory.len());
        next = step.memory.end;
    }
    assert_eq!(next, rec.memory.len(), "every change belongs to an event");
    for c in &rec.memory {
        assert!(rec
            .header
            .regions
            .iter()
            .any(|&(s, l)| c.addr >= s && c.addr + c.len as u64 <= s + l));
        assert_eq!(rec.change_bytes(c).len(), c.len);
    }
    let ram: u64 = rec.header.regions.iter().map(|r| r.1).sum();
    if ram > MAX_REPLAY_RAM || rec.steps.len() > MAX_REPLAY_STEPS {
        return;
    }
    for policy in [
        Policy::per_leaf(),
        Policy::strict(),
        Policy::deferred(4, Duration::from_millis(1)),
    ] {
        // A layout vm-memory refuses (overlapping regions) is an error, not a panic.
        let _ = replay(&rec, &policy, Host::Type1, Options::default(), &|| 0);
    }
});
