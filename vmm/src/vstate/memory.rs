//! Guest RAM: anonymous mappings from vm-memory, split around the 32-bit MMIO hole.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::ram_regions;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The guest asks for more RAM than the host has.
    #[error("--memory size of {size} MiB is more than the host's {host} MiB of RAM")]
    MoreThanHost { size: u64, host: u64 },
    /// mmap of the RAM failed.
    #[error("cannot allocate {size} MiB of guest memory: {source}")]
    Allocate {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The host's RAM in bytes (MemTotal of /proc/meminfo), if readable.
pub fn host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total(&meminfo)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Refuses guests larger than the host: guest RAM is mapped without reservation, so an
/// oversized guest would only fail later, inside the guest, when the host runs out.
pub fn check_host_memory(size: u64) -> Result<(), MemoryError> {
    match host_memory() {
        Some(host) if size > host => Err(MemoryError::MoreThanHost {
            size: size >> 20,
            host: host >> 20,
        }),
        _ => Ok(()),
    }
}

/// Allocates `size` bytes of guest RAM laid out per [`ram_regions`], backed by transparent
/// huge pages where the host allows (fewer host faults and larger KVM mappings, as QEMU does).
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        size: size >> 20,
        source,
    })?;
    for region in mem.iter() {
        // SAFETY: the range is exactly one live anonymous mapping owned by `mem`; MADV_HUGEPAGE
        // only changes how the kernel backs it.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if rc != 0 {
            log::debug!(
                "MADV_HUGEPAGE on guest RAM failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(mem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_parsing() {
        let m = "MemTotal:        2028916 kB\nMemFree:  1 kB\n";
        assert_eq!(parse_mem_total(m), Some(2028916 * 1024));
        assert_eq!(parse_mem_total("nothing"), None);
        assert!(check_host_memory(1 << 20).is_ok());
        assert!(matches!(
            check_host_memory(u64::MAX),
            Err(MemoryError::MoreThanHost { .. })
        ));
    }

    #[test]
    fn regions_follow_layout() {
        let m = create_guest_memory(64 << 20).unwrap();
        assert_eq!(m.num_regions(), 1);
        let r: Vec<_> = m.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(r, vec![(0, 64 << 20)]);
    }
}
