//! `--viommu inject-control=PATH`: a file a test writes while the guest runs, whose fault
//! injections ([`viommu::inject`], one a line, `#` comments) are armed, counted from then,
//! each time the file changes. The event loop looks at it every 100 ms.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::timerfd::TimerFd;

use super::{lock, SharedVtd};

/// How often the file is looked at.
const PERIOD: Duration = Duration::from_millis(100);
/// Largest control file read: a few injections, not a log.
const MAX_LEN: u64 = 4096;

/// Watches the control file of a unit.
pub struct InjectControl {
    vtd: SharedVtd,
    path: PathBuf,
    timer: TimerFd,
    /// What the file looked like when last read (modification time and length).
    seen: Option<(SystemTime, u64)>,
}

impl InjectControl {
    pub fn new(vtd: SharedVtd, path: PathBuf) -> std::io::Result<Self> {
        let mut timer = TimerFd::new()?;
        timer.reset(PERIOD, Some(PERIOD))?;
        Ok(InjectControl {
            vtd,
            path,
            timer,
            seen: None,
        })
    }

    /// Reads the file if it changed since the last look and arms what it says.
    fn look(&mut self) {
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return;
        };
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        if self.seen == Some(stamp) {
            return;
        }
        self.seen = Some(stamp);
        if meta.len() > MAX_LEN {
            log::warn!(
                "VT-d inject control {}: {} bytes, more than {MAX_LEN}: ignored",
                self.path.display(),
                meta.len()
            );
            return;
        }
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                log::warn!("VT-d inject control {}: {e}", self.path.display());
                return;
            }
        };
        match viommu::inject::parse_list(&text) {
            Ok(list) => {
                let mut vtd = lock(&self.vtd);
                for i in list {
                    if vtd.inject(i) {
                        log::info!("VT-d: injection {i} armed");
                    } else {
                        log::warn!("VT-d: injection {i} not armed: too many armed");
                    }
                }
            }
            Err(e) => log::warn!("VT-d inject control {}: {e}", self.path.display()),
        }
    }
}

impl MutEventSubscriber for InjectControl {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Reading the expiration count re-arms the level-triggered fd.
        if let Err(e) = self.timer.wait() {
            log::warn!("VT-d inject control timer: {e}");
        }
        self.look();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fd = self.timer.as_raw_fd();
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            log::error!("VT-d: cannot watch the inject control timer: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::vtd::VtdUnit;
    use viommu::regs::{FSTS_IQE, FSTS_REG, GCMD_QIE, GCMD_REG, IQT_REG};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn a_changed_control_file_arms_its_injections_once() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let vtd = viommu::Vtd::new(
            viommu::VtdConfig::default(),
            mem,
            Box::new(viommu::testing::RecordingMsi::default()),
            Box::new(viommu::SystemClock::default()),
        )
        .expect("config");
        let unit = VtdUnit::new(vtd, None, None);
        let dir = std::env::temp_dir().join(format!("vmm-inject-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("control");
        let mut control = InjectControl::new(unit.clone(), path.clone()).expect("timerfd");
        control.look(); // no file yet: nothing
        std::fs::write(&path, "# the next descriptor fails\niqe\n").expect("write");
        control.look();
        control.look(); // unchanged: not armed again
        {
            let mut v = lock(&unit);
            v.mmio_write(GCMD_REG, &GCMD_QIE.to_le_bytes());
            // One (zeroed, invalid anyway) descriptor: the injection takes it first.
            v.mmio_write(IQT_REG, &16u64.to_le_bytes());
            let mut fsts = [0u8; 4];
            v.mmio_read(FSTS_REG, &mut fsts);
            assert!(u32::from_le_bytes(fsts) & FSTS_IQE != 0);
            assert_eq!(v.stats().injected, 1);
        }
        std::fs::write(&path, "boom\n").expect("write");
        control.look(); // logged, nothing armed
        let _ = std::fs::remove_dir_all(&dir);
    }
}
