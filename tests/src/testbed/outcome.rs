//! What a finished run showed: the console, its markers, and checks that fail with the console tail.

use std::path::PathBuf;
use std::time::Duration;

use super::console::{Line, Marker};
use super::error::TestbedError;

/// How many console lines a failure report carries.
pub const TAIL_LINES: usize = 40;

/// The facts of the `@@TB L2 init` marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Init {
    pub cpus: u32,
    pub mem_kb: u64,
    /// When the harness saw it, from L0 QEMU's start.
    pub at: Duration,
}

/// The result of a run that completed (L1 ran its scenario and powered off).
#[derive(Clone, Debug)]
pub struct Outcome {
    pub scenario: String,
    pub log: PathBuf,
    pub lines: Vec<Line>,
    pub markers: Vec<Marker>,
    /// From L0 QEMU's start to its exit.
    pub elapsed: Duration,
    /// The exit code of the L1 scenario script (`@@TB L1 scenario-exit=`).
    pub scenario_exit: i32,
}

impl Outcome {
    /// The last `n` console lines, one string.
    pub fn tail(&self, n: usize) -> String {
        tail(&self.lines, n)
    }

    /// An error about this run, carrying the console tail.
    pub fn error(&self, what: impl Into<String>) -> TestbedError {
        TestbedError::Run {
            scenario: self.scenario.clone(),
            what: what.into(),
            log: self.log.clone(),
            tail: self.tail(TAIL_LINES),
        }
    }

    /// `Ok(())` if `cond`, else an error saying `what` with the console tail.
    pub fn ensure(&self, cond: bool, what: impl Into<String>) -> Result<(), TestbedError> {
        if cond {
            Ok(())
        } else {
            Err(self.error(what))
        }
    }

    /// The first marker from `source` named `name`.
    pub fn marker(&self, source: &str, name: &str) -> Option<&Marker> {
        self.markers
            .iter()
            .find(|m| m.source == source && m.name == name)
    }

    /// Every marker from `source` named `name`.
    pub fn markers_named<'a>(
        &'a self,
        source: &'a str,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Marker> + 'a {
        self.markers
            .iter()
            .filter(move |m| m.source == source && m.name == name)
    }

    /// Like [`Outcome::marker`], but a missing marker is an error.
    pub fn expect_marker(&self, source: &str, name: &str) -> Result<&Marker, TestbedError> {
        self.marker(source, name)
            .ok_or_else(|| self.error(format!("no `@@TB {source} {name}` marker on the console")))
    }

    /// The `@@TB L1 ready` marker: L1 booted and loaded KVM and VFIO.
    pub fn l1_ready(&self) -> Result<&Marker, TestbedError> {
        self.expect_marker("L1", "ready")
    }

    /// The L2 init marker: the L2 kernel booted and ran its init, with this many CPUs and memory.
    pub fn l2_init(&self) -> Result<L2Init, TestbedError> {
        let m = self.expect_marker("L2", "init")?;
        match (m.field_num("cpus"), m.field_num("mem_kb")) {
            (Some(cpus), Some(mem_kb)) => Ok(L2Init {
                cpus,
                mem_kb,
                at: m.at,
            }),
            _ => Err(self.error(format!("malformed L2 init marker: {}", m.raw))),
        }
    }

    /// The md5 the L2 `nvme-pt` action read from the passed-through NVMe disk
    /// (`@@TB L2 nvme-pt read ... md5=M`).
    pub fn nvme_read_md5(&self) -> Result<String, TestbedError> {
        let read = self
            .markers_named("L2", "nvme-pt")
            .find(|m| m.words.first().map(String::as_str) == Some("read"))
            .ok_or_else(|| self.error("no `nvme-pt read` marker: the guest found no NVMe disk"))?;
        Ok(read.fields.get("md5").cloned().unwrap_or_default())
    }

    /// The L2 VMM's exit code (`@@TB VMM exit=RC`).
    pub fn vmm_exit(&self) -> Result<i32, TestbedError> {
        let m = self.expect_marker("VMM", "exit")?;
        m.field_num("exit")
            .ok_or_else(|| self.error(format!("malformed VMM exit marker: {}", m.raw)))
    }

    /// The last line the L2 VMM wrote to stderr (`@@TB VMM stderr-last: TEXT`), if it wrote any.
    pub fn vmm_stderr_last(&self) -> Option<&str> {
        let m = self.marker("VMM", "stderr-last")?;
        m.raw.split_once("stderr-last:").map(|(_, t)| t.trim())
    }

    /// Seconds the L2 VMM ran, as L1 measured it (`@@TB VMM exit=RC secs=S`).
    pub fn vmm_secs(&self) -> Option<f64> {
        self.marker("VMM", "exit")?.field_num("secs")
    }

    /// The one-line JSON of the VT-d counters the vmm wrote, as the L1 script printed it
    /// (`@@TB L1 stats JSON`, see [`super::viommu`]).
    pub fn vmm_stats(&self) -> Result<String, TestbedError> {
        self.lines
            .iter()
            .find_map(|l| {
                l.text
                    .split_once("@@TB L1 stats ")
                    .map(|(_, j)| j.trim().to_string())
            })
            .ok_or_else(|| self.error("no stats marker: the vmm wrote no --stats-json file"))
    }

    /// The first unsigned counter named `key` in [`Outcome::vmm_stats`]; a dotted key such as
    /// `caches.iotlb.misses` names the first `misses` after the first `iotlb` after the first
    /// `caches`, which is the nested counter: the vmm writes every object's keys sorted.
    pub fn stats_counter(&self, key: &str) -> Result<u64, TestbedError> {
        let json = self.vmm_stats()?;
        key.split('.')
            .try_fold(json.as_str(), |rest, k| {
                rest.split_once(&format!("\"{k}\":")).map(|(_, r)| r)
            })
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| self.error(format!("no counter {key} in {json}")))
    }

    /// Whether any console line contains `needle`.
    pub fn console_contains(&self, needle: &str) -> bool {
        self.lines.iter().any(|l| l.text.contains(needle))
    }
}

pub(crate) fn tail(lines: &[Line], n: usize) -> String {
    let start = lines.len().saturating_sub(n);
    lines[start..]
        .iter()
        .map(|l| l.text.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}
