//! [`Tap`]: the unit's guest memory, seen by a [`Recorder`] when one is attached.

use std::cell::RefCell;

use vm_memory::GuestMemoryBackend;

use super::recorder::Recorder;
use crate::memory::TableMemory;

/// Guest memory as the unit uses it, with an optional recorder that sees every read and write.
/// Without one, each access costs one branch more than plain memory.
pub struct Tap<M> {
    inner: M,
    recorder: Option<RefCell<Recorder>>,
}

impl<M> Tap<M> {
    pub fn new(inner: M) -> Self {
        Tap {
            inner,
            recorder: None,
        }
    }

    pub fn inner(&self) -> &M {
        &self.inner
    }

    /// The recorder, when recording.
    pub(crate) fn recorder(&self) -> Option<std::cell::RefMut<'_, Recorder>> {
        self.recorder.as_ref().map(RefCell::borrow_mut)
    }

    pub(crate) fn set_recorder(&mut self, recorder: Option<Recorder>) -> Option<Recorder> {
        std::mem::replace(&mut self.recorder, recorder.map(RefCell::new)).map(RefCell::into_inner)
    }
}

impl<M: GuestMemoryBackend> TableMemory for Tap<M> {
    fn read_bytes(&self, addr: u64, buf: &mut [u8]) -> bool {
        let ok = self.inner.read_bytes(addr, buf);
        if let (true, Some(r)) = (ok, &self.recorder) {
            r.borrow_mut().read(addr, buf);
        }
        ok
    }

    fn write_bytes(&self, addr: u64, data: &[u8]) -> bool {
        let ok = self.inner.write_bytes(addr, data);
        if let (true, Some(r)) = (ok, &self.recorder) {
            r.borrow_mut().wrote(addr, data);
        }
        ok
    }

    fn compare_exchange_u64(&self, addr: u64, current: u64, new: u64) -> Option<bool> {
        let swapped = self.inner.compare_exchange_u64(addr, current, new);
        if let (Some(true), Some(r)) = (swapped, &self.recorder) {
            r.borrow_mut().wrote(addr, &new.to_le_bytes());
        }
        swapped
    }
}
