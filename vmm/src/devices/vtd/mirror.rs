//! The VT-d register window published as a read-only guest page.
//!
//! VT-d register reads have no side effects, and drivers read registers in their hottest loops
//! (Linux reads FSTS on every poll of an invalidation wait). With the window in a read-only KVM
//! memory slot, reads are plain memory loads and only writes exit, as MMIO, to the register
//! device. The page is re-rendered from the model whenever the model may have changed.
//!
//! Two rules keep this sound, and both hold by construction: the page is written only by
//! whoever holds the unit's lock (a [`RegisterMirror`] is not `Sync`, and the unit keeps it under
//! the same lock as the model, see [`super::VtdUnit`]); and the page is unmapped only after the
//! KVM slot that shows it to the guest is gone (the mirror owns both, and its `Drop` removes the
//! slot first).

use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use viommu::regs::{REG_IMAGE_WORDS, REG_WINDOW_SIZE};
use viommu::Vtd;
use vm_memory::GuestMemoryMmap;

use crate::vstate::vm::{Vm, VmError};

/// Why the register page could not be published.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("cannot allocate the VT-d register page: {0}")]
    Allocate(#[source] std::io::Error),
    #[error("cannot map the VT-d register page into the guest: {0}")]
    Map(#[source] VmError),
}

/// One anonymous page, unmapped on drop.
struct Page(NonNull<u64>);

impl Page {
    /// Allocates the page (zeroed: reserved offsets read as zero).
    fn new() -> std::io::Result<Self> {
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
        Ok(Page(page))
    }

    fn word(&self, offset: u64) -> *mut u64 {
        let i = (offset / 8) as usize % REG_IMAGE_WORDS;
        // SAFETY: `i` < REG_IMAGE_WORDS, so the pointer stays inside the page.
        unsafe { self.0.as_ptr().add(i) }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this size, and nothing refers to it any
        // more: the only owner of a page shown to the guest, `RegisterMirror`, drops it only
        // once the KVM slot is gone.
        unsafe { libc::munmap(self.0.as_ptr().cast(), REG_WINDOW_SIZE as usize) };
    }
}

/// A read-only KVM memory slot.
struct ReadonlySlot {
    vm: Arc<VmFd>,
    slot: u32,
    gpa: u64,
}

impl ReadonlySlot {
    /// Deletes the slot: once this returns Ok, no vCPU can reach the memory behind it.
    fn remove(self) -> Result<(), kvm_ioctls::Error> {
        let region = kvm_userspace_memory_region {
            slot: self.slot,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: self.gpa,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero-sized region deletes the slot; no host memory is handed to KVM.
        unsafe { self.vm.set_user_memory_region(region) }
    }
}

/// The guest-visible image of the register window: one page, shown to the guest read-only.
pub struct RegisterMirror {
    /// Dropped by hand, after the slot is removed (see `Drop`).
    page: ManuallyDrop<Page>,
    /// None only for a page no guest sees (tests).
    slot: Option<ReadonlySlot>,
}

// SAFETY: the mirror owns its page and slot outright; moving it to another thread moves that
// ownership. It is deliberately not `Sync`: the page is written through `&mut self`.
unsafe impl Send for RegisterMirror {}

impl RegisterMirror {
    /// Allocates the page and maps it read-only into the guest of `vm` at `gpa`.
    pub fn map(vm: &Vm, gpa: u64) -> Result<Self, MirrorError> {
        let page = Page::new().map_err(MirrorError::Allocate)?;
        // SAFETY: the page stays mapped for as long as the slot exists: both belong to the
        // mirror, whose `Drop` removes the slot before it unmaps the page.
        let slot = unsafe { vm.map_readonly(gpa, REG_WINDOW_SIZE, page.0.as_ptr() as u64) }
            .map_err(MirrorError::Map)?;
        Ok(RegisterMirror {
            page: ManuallyDrop::new(page),
            slot: Some(ReadonlySlot {
                vm: vm.shared_fd(),
                slot,
                gpa,
            }),
        })
    }

    /// A page no guest sees.
    #[cfg(test)]
    pub(super) fn unmapped() -> std::io::Result<Self> {
        Ok(RegisterMirror {
            page: ManuallyDrop::new(Page::new()?),
            slot: None,
        })
    }

    /// Copies the unit's registers into the page (the words that hold registers; the rest stay
    /// zero). Only words that changed are stored, each as one aligned 8-byte store, so a guest
    /// never reads a torn register. Called by the unit's guard, under its lock.
    pub(super) fn render(&mut self, vtd: &Vtd<GuestMemoryMmap>) {
        vtd.visit_registers(|offset, word| {
            let p = self.page.word(offset);
            // SAFETY: `p` is an aligned word of the live page, written only here, through
            // `&mut self`; volatile because the guest reads it behind the compiler's back.
            unsafe {
                if std::ptr::read_volatile(p) != word {
                    std::ptr::write_volatile(p, word);
                }
            }
        });
    }

    /// The page as the guest sees it.
    #[cfg(test)]
    pub(super) fn word(&self, offset: u64) -> u64 {
        // SAFETY: an aligned word of the live page.
        unsafe { std::ptr::read_volatile(self.page.word(offset)) }
    }
}

impl Drop for RegisterMirror {
    fn drop(&mut self) {
        // The guest must lose sight of the page before the page goes.
        let hidden = match self.slot.take() {
            None => true,
            Some(slot) => slot
                .remove()
                .map_err(|e| {
                    log::error!(
                        "VT-d: cannot remove the register page's KVM slot ({e}): leaking the page"
                    )
                })
                .is_ok(),
        };
        if hidden {
            // SAFETY: `page` is dropped here once and never used again.
            unsafe { ManuallyDrop::drop(&mut self.page) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use viommu::regs::{CAP_REG, FEDATA_REG, VER_REG};
    use viommu::testing::RecordingMsi;
    use vm_memory::GuestAddress;

    use crate::arch::x86_64::layout::VTD_REGS_START;

    /// Does not compile if `T` is `Sync`: `<T as AmbiguousIfSync<_>>::some_item` then has two
    /// candidate impls.
    trait AmbiguousIfSync<A> {
        fn some_item() {}
    }
    impl<T: ?Sized> AmbiguousIfSync<()> for T {}
    impl<T: ?Sized + Sync> AmbiguousIfSync<u8> for T {}

    #[test]
    fn the_mirror_is_not_shared_between_threads() {
        // Rendering writes the page through `&mut self`; a `Sync` mirror would let two threads
        // holding `&RegisterMirror` race on it.
        <RegisterMirror as AmbiguousIfSync<_>>::some_item();
    }

    fn unit() -> Vtd<GuestMemoryMmap> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        Vtd::new(
            viommu::VtdConfig::default(),
            mem,
            Box::new(RecordingMsi::default()),
            Box::new(viommu::SystemClock::default()),
        )
        .expect("config")
    }

    #[test]
    fn render_publishes_registers_and_follows_writes() {
        let mut vtd = unit();
        let mut mirror = RegisterMirror::unmapped().expect("page");
        mirror.render(&vtd);
        let mut q = [0u8; 8];
        vtd.mmio_read(CAP_REG, &mut q);
        assert_eq!(mirror.word(CAP_REG), u64::from_le_bytes(q));
        assert_eq!(mirror.word(VER_REG) as u32, 0x10, "VER 1.0");
        vtd.mmio_write(FEDATA_REG, &0xabcdu32.to_le_bytes());
        mirror.render(&vtd);
        assert_eq!((mirror.word(FEDATA_REG & !7) >> 32) as u32, 0xabcd);
    }

    /// Whether this machine can run the KVM tests; without /dev/kvm they skip loudly, and fail
    /// when CI=true.
    fn kvm_available() -> bool {
        if std::path::Path::new("/dev/kvm").exists() {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "/dev/kvm is missing (CI=true: failing instead of skipping)"
        );
        eprintln!("SKIPPED: /dev/kvm is missing");
        false
    }

    #[test]
    fn dropping_the_mirror_removes_its_kvm_slot_before_the_page_goes() {
        if !kvm_available() {
            return;
        }
        let vm = Vm::new().expect("a KVM VM");
        if !vm.has_readonly_mem() {
            eprintln!("SKIPPED: KVM cannot map read-only memory");
            return;
        }
        let mirror = RegisterMirror::map(&vm, VTD_REGS_START).expect("mirror");
        assert!(
            matches!(
                RegisterMirror::map(&vm, VTD_REGS_START),
                Err(MirrorError::Map(_))
            ),
            "KVM refuses a second slot over the same guest range"
        );
        drop(mirror);
        // The range is free again: the slot went with the mirror, before its page.
        let again = RegisterMirror::map(&vm, VTD_REGS_START);
        assert!(again.is_ok(), "{:?}", again.err());
    }
}
