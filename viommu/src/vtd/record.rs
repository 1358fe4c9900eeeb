//! Recording the unit's traffic (see [`crate::record`]): starting and finishing a recording, and
//! the hook every entry point that changes the unit calls first.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::Vtd;
use crate::record::{Event, Header, RecordSummary, Recorder};
use crate::Stats;

/// Why a recording could not start.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("a recording must start on a unit fresh from Vtd::new (this one has handled events)")]
    NotFresh,
    #[error("the unit is already recording")]
    AlreadyRecording,
}

impl<M: GuestMemoryBackend> Vtd<M> {
    /// Starts recording everything that changes the unit into `recorder` (see
    /// [`crate::record`]), from its reset state: call it before anything else. The devices
    /// attached from then on keep their identity views in their own host domains rather than
    /// the host's shared identity domain ([`Vtd::attach`]), as replay does.
    pub fn start_recording(&mut self, mut recorder: Recorder) -> Result<(), RecordError> {
        if self.mem.recorder().is_some() {
            return Err(RecordError::AlreadyRecording);
        }
        if self.stats != Stats::default() || !self.spaces.is_empty() || self.root_table != 0 {
            return Err(RecordError::NotFresh);
        }
        let header = Header {
            config: self.config,
            regions: self
                .mem
                .inner()
                .iter()
                .map(|r| (r.start_addr().0, r.len()))
                .collect(),
        };
        recorder.start(&header, self.clock.now());
        self.mem.set_recorder(Some(recorder));
        Ok(())
    }

    /// Closes the recording with the unit's counters (the same JSON object as
    /// [`Stats`] serializes to) and flushes it. None when not recording.
    pub fn finish_recording(&mut self) -> Option<RecordSummary> {
        let mut recorder = self.mem.set_recorder(None)?;
        // A plain struct of integers always serializes.
        let stats = serde_json::to_string(&self.stats).unwrap_or_default();
        Some(recorder.finish(&stats))
    }

    /// What the recording holds and cost so far, when recording.
    pub fn recording(&self) -> Option<RecordSummary> {
        self.mem.recorder().map(|r| r.summary())
    }

    /// Records `event`, which the unit is about to handle, when recording.
    pub(super) fn record_event(&self, event: Event) {
        if let Some(mut r) = self.mem.recorder() {
            r.event(|| self.clock.now(), &event);
        }
    }
}
