//! Exercises the passthrough crate on a real VFIO device, without a VM (the testbed's L1 runs it).
//!
//! `vfio_probe check PATH [UID]`: the set-up checks (as UID if given); prints `probe ok` or
//! the error line, exits 0 or 1.
//! `vfio_probe edu PATH`: opens QEMU's edu device, maps a 2 MiB "guest RAM" for DMA at IOVA =
//! GPA through `HostDmaMappings`, copies a pattern RAM -> device buffer -> RAM with the edu DMA
//! engine (BAR0 mmapped), waits for its completion MSI on a VFIO eventfd, compares, and tears
//! everything down. Prints `probe edu dma=ok msi=ok` on success.

use std::path::Path;
use std::time::{Duration, Instant};

use passthrough::access::MmapArea;
use passthrough::access::{IrqKind, VfioAccess};
use passthrough::dma::HostDmaMappings;
use passthrough::function::PAGE_SIZE;
use passthrough::setup::{check, HostPaths, VfioHost};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// edu registers (QEMU hw/misc/edu.c).
const EDU_ID: usize = 0x00;
const EDU_DMA_SRC: usize = 0x80;
const EDU_DMA_DST: usize = 0x88;
const EDU_DMA_CNT: usize = 0x90;
const EDU_DMA_CMD: usize = 0x98;
const EDU_DMA_START: u64 = 1;
const EDU_DMA_TO_RAM: u64 = 2;
const EDU_DMA_IRQ: u64 = 4;
const EDU_INTR_ACK: usize = 0x64;
const EDU_BUF: u64 = 0x40000;
/// Bytes copied: less than the 4 KiB buffer, because QEMU 7.2's edu range check rejects a
/// transfer ending exactly at the buffer's end (and stops QEMU with a hardware error).
const LEN: usize = 2048;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let r = match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("check"), Some(path)) => {
            if let Some(uid) = args.get(3).and_then(|u| u.parse::<u32>().ok()) {
                // SAFETY: plain syscalls dropping privileges.
                unsafe {
                    libc::setgid(uid);
                    libc::setuid(uid);
                }
            }
            check(&HostPaths::default(), Path::new(path))
                .map(|_| ())
                .map_err(Into::into)
        }
        (Some("edu"), Some(path)) => edu(Path::new(path)),
        _ => Err("usage: vfio_probe check PATH [UID] | edu PATH".into()),
    };
    match r {
        Ok(()) => println!("probe ok"),
        Err(e) => {
            println!("probe error: {e}");
            std::process::exit(1);
        }
    }
}

struct Bar0 {
    ptr: *mut u8,
}

impl Bar0 {
    fn r32(&self, off: usize) -> u32 {
        // SAFETY: inside the mmapped BAR; device memory needs volatile access.
        unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<u32>()) }
    }
    fn w32(&self, off: usize, v: u32) {
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(self.ptr.add(off).cast::<u32>(), v) }
    }
    fn w64(&self, off: usize, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }
    fn r64(&self, off: usize) -> u64 {
        u64::from(self.r32(off)) | u64::from(self.r32(off + 4)) << 32
    }
}

/// What the probe prints after `probe error:`.
type ProbeError = Box<dyn std::error::Error>;

fn dma(
    bar: &Bar0,
    src: u64,
    dst: u64,
    len: u64,
    cmd: u64,
    irq: &EventFd,
) -> Result<(), ProbeError> {
    bar.w64(EDU_DMA_SRC, src);
    bar.w64(EDU_DMA_DST, dst);
    bar.w64(EDU_DMA_CNT, len);
    bar.w64(EDU_DMA_CMD, cmd | EDU_DMA_START | EDU_DMA_IRQ);
    let t = Instant::now();
    loop {
        if irq.read().is_ok() {
            break;
        }
        if t.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "no completion MSI in 10 s (cmd {:#x})",
                bar.r64(EDU_DMA_CMD)
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bar.w32(EDU_INTR_ACK, 0x100);
    Ok(())
}

fn edu(path: &Path) -> Result<(), ProbeError> {
    let host = VfioHost::new(HostPaths::default(), None)?;
    let dev = host.open(path)?;
    dev.reset();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)])?;
    let mut dma_map = HostDmaMappings::new(host.container().clone(), mem.clone());
    dma_map.map_guest_ram()?;

    let size = dev.region(0).ok_or("edu has no BAR0")?.size;
    let mapping = dev
        .mmap(
            0,
            MmapArea {
                offset: 0,
                size: size.max(PAGE_SIZE),
            },
        )
        .map_err(|e| format!("mmap BAR0: {e}"))?;
    let bar = Bar0 {
        ptr: mapping.host_addr() as *mut u8,
    };
    // Memory decode and bus mastering (the guest driver's job in a VM).
    let mut cmd = [0u8; 2];
    dev.read(passthrough::access::CONFIG_REGION, 4, &mut cmd);
    let c = u16::from_le_bytes(cmd) | 0x6;
    dev.write(passthrough::access::CONFIG_REGION, 4, &c.to_le_bytes());
    let id = bar.r32(EDU_ID);
    if id & 0xffff != 0x00ed {
        return Err(format!("edu ID register reads {id:#x}").into());
    }

    let irq = EventFd::new(EFD_NONBLOCK)?;
    dev.enable_irq(IrqKind::Msi, &[&irq])?;

    let pattern: Vec<u8> = (0..LEN as u32).map(|i| (i * 7 + 3) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(0x1000))?;
    dma(&bar, 0x1000, EDU_BUF, LEN as u64, 0, &irq)?;
    dma(&bar, EDU_BUF, 0x3000, LEN as u64, EDU_DMA_TO_RAM, &irq)?;
    let mut back = vec![0u8; LEN];
    mem.read_slice(&mut back, GuestAddress(0x3000))?;
    if back != pattern {
        let first = back
            .iter()
            .zip(&pattern)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(format!("DMA round trip differs first at byte {first}").into());
    }
    dev.disable_irq(IrqKind::Msi)?;
    println!(
        "probe edu dma=ok msi=ok mappings={}",
        dma_map.mappings().count()
    );
    drop(mapping);
    drop(dma_map);
    dev.reset();
    Ok(())
}
