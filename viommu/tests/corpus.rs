//! The replay corpus (`resources/viommu-corpus`: recordings of the testbed's L2 Linux driving a
//! passed-through NVMe behind our unit, made by `resources/testbed/record-viommu.sh`) through the
//! engine, in seconds: each replays as recorded to exactly the counters the live run wrote to
//! `--stats-json`, twice alike, and the policies keep the performance goals of issue 16 on every
//! stream: strict never more host calls or flushes than the QEMU-like per-leaf policy, at least
//! 1.9x fewer calls on the 128 KiB stream, and deferred at least 10x fewer flushes than per-leaf
//! on the QD1 stream.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use viommu::record::{Ending, Recording};
use viommu::replay::{compare_with_live, replay, Host, LiveMatch, Options, Outcome, Policy};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../resources/viommu-corpus")
}

fn load(name: &str) -> Recording {
    let path = corpus_dir().join(format!("{name}.vtdrec.gz"));
    let raw = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut data = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_end(&mut data)
        .expect("gzip");
    Recording::parse(&data).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn run(rec: &Recording, policy: &Policy) -> Outcome {
    replay(rec, policy, Host::Type1, Options::default(), &|| 0).expect("replays")
}

const NAMES: [&str; 4] = ["boot", "dd-4k", "dd-128k", "fio-2x4"];

fn deferred() -> Policy {
    Policy::deferred(256, Duration::from_millis(10))
}

#[test]
fn every_recording_replays_as_recorded_to_the_live_counters_and_twice_alike() {
    for name in NAMES {
        let rec = load(name);
        assert!(matches!(rec.ending, Ending::End { .. }), "{name} is whole");
        let strict = Policy::strict();
        assert_eq!(
            (rec.header.config.strategy, rec.header.config.flush),
            (strict.strategy, strict.flush),
            "{name} was recorded in strict mode"
        );
        let a = run(&rec, &strict);
        assert_eq!(compare_with_live(&rec, &a.stats), LiveMatch::Same, "{name}");
        // The live run's --stats-json, kept beside the recording, says the same.
        let stats_json = corpus_dir().join(format!("{name}.stats.json"));
        let live: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&stats_json).expect("stats file"))
                .expect("json");
        let replayed = serde_json::to_value(a.stats).expect("json");
        // Every counter the live run wrote (the recordings predate the caches' and the
        // injections' counters).
        for (key, value) in replayed.as_object().expect("object") {
            if live.get(key).is_some() {
                assert_eq!(&live[key], value, "{name}: {key}");
            }
        }
        let b = run(&rec, &strict);
        assert_eq!(a.stats, b.stats, "{name}");
        for policy in [Policy::per_leaf(), deferred()] {
            assert_eq!(run(&rec, &policy).stats, run(&rec, &policy).stats, "{name}");
        }
    }
}

#[test]
fn strict_never_costs_more_host_work_than_per_leaf_and_batches_128k_io() {
    for name in NAMES {
        let rec = load(name);
        let per_leaf = run(&rec, &Policy::per_leaf());
        let strict = run(&rec, &Policy::strict());
        assert!(
            strict.host_calls() <= per_leaf.host_calls()
                && strict.host_flushes() <= per_leaf.host_flushes(),
            "{name}: strict {} calls {} flushes, per-leaf {} calls {} flushes",
            strict.host_calls(),
            strict.host_flushes(),
            per_leaf.host_calls(),
            per_leaf.host_flushes()
        );
        assert_eq!(strict.stats.host_errors, 0, "{name}");
        if name == "dd-128k" {
            let ratio = per_leaf.host_calls() as f64 / strict.host_calls() as f64;
            assert!(ratio >= 1.9, "{name}: {ratio:.2}x fewer calls");
        }
    }
}

#[test]
fn deferred_flushes_the_host_iotlb_ten_times_less_than_per_leaf_at_qd1() {
    let rec = load("dd-4k");
    let per_leaf = run(&rec, &Policy::per_leaf());
    let deferred = run(&rec, &deferred());
    let ratio = per_leaf.host_flushes() as f64 / deferred.host_flushes().max(1) as f64;
    assert!(
        ratio >= 10.0,
        "per-leaf {} flushes, deferred {}",
        per_leaf.host_flushes(),
        deferred.host_flushes()
    );
}

/// The recorder gets the same streams again: recording a replay of each corpus recording must
/// hold the same events and guest memory, so the re-recording replays to the same counters and
/// re-records to the same bytes.
#[test]
fn recording_a_replay_gives_a_recording_of_the_same_stream() {
    let dir = std::env::temp_dir().join(format!("viommu-corpus-rerecord-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for name in NAMES {
        let rec = load(name);
        let first = dir.join(format!("{name}.1.vtdrec"));
        let strict = Policy::strict();
        let options = |path: &PathBuf| Options {
            record: Some(path.clone()),
            ..Options::default()
        };
        let live = replay(&rec, &strict, Host::Type1, options(&first), &|| 0).expect("replays");
        let summary = live.recording.expect("recorded");
        assert!(!summary.capped && !summary.failed, "{name}: {summary:?}");
        assert_eq!(
            summary.events as usize,
            rec.steps.len(),
            "{name}: every event"
        );
        let bytes = std::fs::read(&first).expect("recording");
        let again = Recording::parse(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            again.steps.iter().map(|s| s.event).collect::<Vec<_>>(),
            rec.steps.iter().map(|s| s.event).collect::<Vec<_>>(),
            "{name}: the events"
        );
        assert_eq!(
            compare_with_live(&again, &run(&again, &strict).stats),
            LiveMatch::Same,
            "{name}: the re-recording replays to the counters it closed with"
        );
        assert_eq!(run(&again, &strict).stats, live.stats, "{name}");
        let second = dir.join(format!("{name}.2.vtdrec"));
        replay(&again, &strict, Host::Type1, options(&second), &|| 0).expect("replays");
        assert!(
            std::fs::read(&second).expect("recording") == bytes,
            "{name}: re-recording the re-recording changes nothing"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
