//! `vmm replay` as a user runs it: a recording made by a unit driven as Linux drives it (plain
//! and gzip-compressed) replays under the three policies, one `trace=` line each, the same counts
//! every time, and exactly the live counters when replayed as recorded; a corrupt or truncated
//! recording is one error line naming the offset. None of this needs KVM.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output};

use viommu::descriptor::encode;
use viommu::record::Recorder;
use viommu::testing::{mem, Driver, ManualClock, RecordingMsi, SharedHost, SimHost, Tables};
use viommu::{Perm, SourceId, Vtd, VtdConfig};

const DEV: SourceId = SourceId(0x0018);

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run the vmm binary")
}

/// A directory of this process for `test` alone (tests run in parallel).
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-replay-test-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A recording of a unit that a Linux-like driver put through 50 single-page and 20 8-page
/// map/unmap cycles, strict, made in `dir`; and the unit's counters when it was closed.
fn record(dir: &std::path::Path) -> (Vec<u8>, viommu::Stats) {
    let m = mem();
    let clock = ManualClock::default();
    let mut vtd = Vtd::new(
        VtdConfig::default(),
        m.clone(),
        Box::new(RecordingMsi::default()),
        Box::new(clock.clone()),
    )
    .expect("config");
    let path = dir.join("made.vtdrec");
    let file = std::fs::File::create(&path).expect("recording file");
    vtd.start_recording(Recorder::new(Box::new(file), "made", 1 << 30))
        .expect("fresh unit");
    vtd.attach(DEV, Box::new(SharedHost::new(SimHost::new())))
        .expect("attach");
    let mut drv = Driver::new();
    let mut t = Tables::new(&m);
    let pt = t.context(DEV, 1, 4);
    drv.enable_qi(&mut vtd);
    drv.set_root(&mut vtd, t.root);
    let mut token = 1;
    assert!(drv.submit_sync(
        &mut vtd,
        &m,
        &[encode::context_global(), encode::iotlb_global()],
        token
    ));
    drv.set_translation(&mut vtd, true);
    for (n, pages) in [(50u64, 1u64), (20, 8)] {
        for i in 0..n {
            let iova = 0xfff0_0000 - (i % 4) * 0x10_0000;
            let gpa = 0x20_0000 + (i % 3) * 0x10_0000;
            let am = pages.trailing_zeros() as u8;
            t.map(pt, iova, gpa, pages << 12, Perm::RW);
            token += 1;
            clock.advance(std::time::Duration::from_micros(200));
            assert!(drv.submit_sync(
                &mut vtd,
                &m,
                &[encode::iotlb_page(1, iova, am, false)],
                token
            ));
            t.unmap(pt, iova, pages << 12);
            token += 1;
            assert!(drv.submit_sync(
                &mut vtd,
                &m,
                &[encode::iotlb_page(1, iova, am, false)],
                token
            ));
        }
    }
    vtd.flush_deferred();
    let stats = vtd.stats();
    vtd.finish_recording().expect("was recording");
    (std::fs::read(&path).expect("read back"), stats)
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} in {line}"))
}

#[test]
fn replay_prints_a_line_per_policy_with_the_same_counts_every_time_and_the_live_counters() {
    let dir = temp_dir("lines");
    let (bytes, live) = record(&dir);
    let plain = dir.join("cycles.vtdrec");
    std::fs::write(&plain, &bytes).expect("write");
    let gz = dir.join("cycles-gz.vtdrec.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(&bytes).expect("gzip");
    std::fs::write(&gz, enc.finish().expect("gzip")).expect("write");
    let json = dir.join("out.json");
    let args = [
        "replay",
        plain.to_str().expect("utf-8"),
        gz.to_str().expect("utf-8"),
        "--runs",
        "1",
        "--json",
        json.to_str().expect("utf-8"),
    ];
    let first = vmm(&args);
    assert!(first.status.success(), "{first:?}");
    let text = String::from_utf8_lossy(&first.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 8, "{text}");
    for trace in ["cycles", "cycles-gz"] {
        let mine: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with(&format!("trace={trace} ")))
            .collect();
        let policies: Vec<&str> = mine[..3].iter().map(|l| field(l, "policy")).collect();
        assert_eq!(policies, ["per-leaf", "strict", "deferred"]);
        assert_eq!(field(mine[3], "live"), "same", "{}", mine[3]);
        let strict = mine[1];
        assert_eq!(
            field(strict, "calls"),
            (live.host_map_calls + live.host_unmap_calls).to_string()
        );
        assert_eq!(
            field(strict, "flushes"),
            live.host_mappings_removed.to_string()
        );
        assert_eq!(field(strict, "descriptors"), live.descriptors.to_string());
        let per_leaf_calls: u64 = field(mine[0], "calls").parse().expect("number");
        let strict_calls: u64 = field(strict, "calls").parse().expect("number");
        assert!(strict_calls < per_leaf_calls, "{text}");
    }
    // The same file twice, and the same file again: the same counts (times vary).
    let counts = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| {
                l.split_whitespace()
                    .filter(|kv| !kv.starts_with("ns_per_desc=") && !kv.starts_with("cpu_vs"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .map(|l| l.replace("trace=cycles-gz ", "trace=cycles "))
            .collect()
    };
    let c = counts(&text);
    assert_eq!(c[..4], c[4..], "plain and compressed replay alike");
    let again = vmm(&args);
    assert_eq!(counts(&String::from_utf8_lossy(&again.stdout)), c);
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("valid json");
    assert_eq!(j["recordings"].as_array().map(Vec::len), Some(2));
    assert_eq!(j["recordings"][0]["policies"][1]["policy"], "strict");
}

#[test]
fn a_truncated_or_corrupt_recording_is_one_line_naming_the_offset() {
    let dir = temp_dir("corrupt");
    let (bytes, _) = record(&dir);
    let cut = dir.join("cut.vtdrec");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let bad = dir.join("bad.vtdrec");
    let mut b = bytes.clone();
    b[9] = 7;
    std::fs::write(&bad, &b).expect("write");
    for (path, needle) in [
        (&cut, "expected"),
        (&bad, "at byte offset 8: expected format version 1"),
    ] {
        let out = vmm(&["replay", path.to_str().expect("utf-8")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("corrupt or truncated at byte offset"),
            "{stderr}"
        );
        assert!(stderr.contains(needle), "{stderr}");
        assert!(!stderr.contains("panicked"));
    }
    let out = vmm(&["replay"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs at least one recording"));
    let out = vmm(&["replay", "--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: vmm replay PATH..."));
}
