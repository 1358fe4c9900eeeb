//! The VT-d register window published as a read-only guest page.
//!
//! VT-d register reads have no side effects, and drivers read registers in their hottest loops
//! (Linux reads FSTS on every poll of an invalidation wait). With the window in a read-only KVM
//! memory slot, reads are plain memory loads and only writes exit, as MMIO, to the register
//! device. The page is re-rendered from the model whenever the model may have changed.

use std::ptr::NonNull;

use viommu::regs::{REG_IMAGE_WORDS, REG_WINDOW_SIZE};
use viommu::Vtd;
use vm_memory::GuestMemoryMmap;

/// One anonymous page holding the guest-visible image of the register window.
pub struct RegisterMirror {
    page: NonNull<u64>,
}

// SAFETY: the page is only written through `render`, which callers serialise (it runs under the
// unit's lock); the guest reading it concurrently sees each aligned word either old or new, as
// it would a hardware register.
unsafe impl Send for RegisterMirror {}
// SAFETY: as above; `&RegisterMirror` gives no access but `render` and `host_address`.
unsafe impl Sync for RegisterMirror {}

impl RegisterMirror {
    /// Allocates the page (zeroed: reserved offsets read as zero).
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REG_WINDOW_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let page = NonNull::new(addr.cast::<u64>()).ok_or(std::io::ErrorKind::OutOfMemory)?;
        Ok(RegisterMirror { page })
    }

    /// Where the page is in our address space, for the KVM memory slot.
    pub fn host_address(&self) -> u64 {
        self.page.as_ptr() as u64
    }

    /// Copies the unit's registers into the page (the words that hold registers; the rest stay
    /// zero). Only words that changed are stored, each as one aligned 8-byte store, so a guest
    /// never reads a torn register.
    pub fn render(&self, vtd: &Vtd<GuestMemoryMmap>) {
        vtd.visit_registers(|offset, word| {
            let i = (offset / 8) as usize % REG_IMAGE_WORDS;
            // SAFETY: `i` < REG_IMAGE_WORDS, so the pointer stays inside the page we own.
            let p = unsafe { self.page.as_ptr().add(i) };
            // SAFETY: `p` is an aligned word of the live page; volatile because the guest
            // reads it behind the compiler's back.
            unsafe {
                if std::ptr::read_volatile(p) != word {
                    std::ptr::write_volatile(p, word);
                }
            }
        });
    }

    /// The page as the guest sees it.
    #[cfg(test)]
    fn word(&self, offset: u64) -> u64 {
        let i = (offset / 8) as usize % REG_IMAGE_WORDS;
        // SAFETY: in bounds by the modulo; aligned word of the live page.
        unsafe { std::ptr::read_volatile(self.page.as_ptr().add(i)) }
    }
}

impl Drop for RegisterMirror {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this size and is not used after drop
        // (the KVM slot that points at it goes with the VM, which the unit's MSI sink keeps
        // alive until the unit itself is dropped).
        unsafe { libc::munmap(self.page.as_ptr().cast(), REG_WINDOW_SIZE as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use viommu::regs::{CAP_REG, FEDATA_REG, VER_REG};
    use viommu::testing::RecordingMsi;
    use vm_memory::GuestAddress;

    #[test]
    fn render_publishes_registers_and_follows_writes() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let mut vtd = Vtd::new(
            viommu::VtdConfig::default(),
            mem,
            Box::new(RecordingMsi::default()),
            Box::new(viommu::SystemClock::default()),
        )
        .expect("config");
        let mirror = RegisterMirror::new().expect("page");
        mirror.render(&vtd);
        let mut q = [0u8; 8];
        vtd.mmio_read(CAP_REG, &mut q);
        assert_eq!(mirror.word(CAP_REG), u64::from_le_bytes(q));
        assert_eq!(mirror.word(VER_REG) as u32, 0x10, "VER 1.0");
        vtd.mmio_write(FEDATA_REG, &0xabcdu32.to_le_bytes());
        mirror.render(&vtd);
        assert_eq!((mirror.word(FEDATA_REG & !7) >> 32) as u32, 0xabcd);
    }
}
