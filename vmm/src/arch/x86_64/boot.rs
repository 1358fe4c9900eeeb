//! Kernel loading: tell a Linux bzImage from a multiboot kernel; for Linux, load the bzImage and
//! initramfs, write the command line and the zero page with its e820 map
//! (Documentation/arch/x86/boot.rst); multiboot kernels go through [`super::multiboot`].

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile};

use super::layout::{
    ram_regions, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MEM_32BIT_GAP_START,
    PCI_ECAM_SIZE, PCI_ECAM_START, RESET_VECTOR, ZERO_PAGE_START,
};
use super::multiboot::{self, MultibootEntry, MultibootError, MultibootHeader};

/// e820 types (ACPI 6.4, Table 15.312 "Address Range Types").
pub const E820_RAM: u32 = 1;
/// Reserved: the OS must not use it as RAM.
pub const E820_RESERVED: u32 = 2;

// Boot protocol constants (Documentation/arch/x86/boot.rst, "The real-mode kernel header").
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff; // type_of_loader: undefined boot loader
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// The 64-bit entry point is 0x200 past the start of the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;
/// Max e820 entries in the zero page.
const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;

/// Errors loading the guest kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The kernel is not a bzImage we can boot.
    #[error("kernel {path} is not a bzImage: {source}")]
    NotBzImage {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    /// The kernel's setup header is not a bzImage's.
    #[error("kernel {path} is not a bzImage: {what}")]
    NotBzImageHeader { path: PathBuf, what: HeaderProblem },
    /// The kernel is neither format we boot.
    #[error(
        "kernel {path} is neither a bzImage (no 'HdrS' magic at offset 0x202) nor a multiboot \
         kernel (no 32-bit aligned header with magic {:#x} and a valid checksum in the first \
         {} bytes)",
        multiboot::MULTIBOOT_HEADER_MAGIC,
        multiboot::MULTIBOOT_SEARCH
    )]
    NotBootable { path: PathBuf },
    /// The kernel is a multiboot kernel we cannot load.
    #[error("multiboot kernel {path}: {source}")]
    Multiboot {
        path: PathBuf,
        source: MultibootError,
    },
    /// The initramfs file cannot be opened or read.
    #[error("cannot read initramfs {path}: {source}")]
    Initramfs {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the top of low memory.
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x}; give more --memory")]
    InitramfsTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line ({len} bytes, at most {max}): {source}")]
    Cmdline {
        len: usize,
        max: usize,
        source: linux_loader::cmdline::Error,
    },
    /// The command line could not be written to guest memory.
    #[error("cannot write the kernel command line at {CMDLINE_START:#x}: {0}")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// Writing the zero page failed.
    #[error("cannot write the zero page: {0}")]
    ZeroPage(linux_loader::configurator::Error),
    /// The reset vector stub could not be written.
    #[error("cannot write the reset stub at {RESET_VECTOR:#x}: {0}")]
    ResetStub(#[source] vm_memory::GuestMemoryError),
    /// Too many e820 entries.
    #[error("e820 map has {0} entries, the zero page holds {E820_MAX_ENTRIES_ZEROPAGE}")]
    E820TooLong(usize),
}

/// What makes a kernel's setup header not a bzImage's we can boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderProblem {
    #[error("file too short for a setup header")]
    TooShort,
    #[error("boot protocol {major}.{minor:02} is older than 2.12")]
    OldProtocol { major: u8, minor: u8 },
    #[error("not loaded high (a zImage)")]
    NotLoadedHigh,
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820_RAM or E820_RESERVED.
    pub kind: u32,
}

/// The e820 map for `ram_size` bytes of RAM: conventional memory up to the EBDA, RAM from 1 MiB
/// to the hole, RAM above 4 GiB, and the ECAM region reserved (Linux only trusts MCFG when the
/// ECAM area is reserved in e820 or ACPI, arch/x86/pci/mmconfig-shared.c).
pub fn e820_map(ram_size: u64) -> Vec<E820Entry> {
    let mut map = Vec::new();
    for (start, size) in ram_regions(ram_size) {
        if start == 0 {
            map.push(E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM,
            });
            if size > HIMEM_START {
                map.push(E820Entry {
                    addr: HIMEM_START,
                    size: size - HIMEM_START,
                    kind: E820_RAM,
                });
            }
        } else {
            map.push(E820Entry {
                addr: start,
                size,
                kind: E820_RAM,
            });
        }
    }
    map.push(E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820_RESERVED,
    });
    map.sort_by_key(|e| e.addr);
    map
}

/// Offset of the setup header's "HdrS" magic in a bzImage (boot.rst, "The real-mode kernel
/// header").
const HDR_MAGIC_OFFSET: usize = 0x202;
/// Offset of the boot protocol version.
const HDR_VERSION_OFFSET: usize = 0x206;
/// Offset of loadflags; bit 0 LOADED_HIGH marks a bzImage.
const HDR_LOADFLAGS_OFFSET: usize = 0x211;

/// What a kernel file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A Linux bzImage (64-bit boot protocol).
    BzImage,
    /// A multiboot kernel, with the header found in it.
    Multiboot(MultibootHeader),
}

impl KernelFormat {
    /// The command line when `--cmdline` is absent: a bzImage gets a serial console and our
    /// reboot/panic choices; a multiboot kernel nothing but its name (its arguments are the
    /// program's own, e.g. a kvm-unit-tests test's).
    pub fn default_cmdline(&self) -> &'static str {
        match self {
            KernelFormat::BzImage => crate::config::DEFAULT_CMDLINE,
            KernelFormat::Multiboot(_) => "",
        }
    }
}

/// Checks, before any VM exists, that `kernel` is a readable bzImage for the 64-bit boot
/// protocol or a multiboot kernel whose header we can honour, and that `initramfs` (if any) is
/// readable, so these errors come first and plainly. As QEMU does, a file with the bzImage
/// magic is a bzImage; anything else is looked at as multiboot.
pub fn check_boot_files(
    kernel: &Path,
    initramfs: Option<&Path>,
) -> Result<KernelFormat, BootError> {
    use std::io::Read;
    let open_err = |source| BootError::OpenKernel {
        path: kernel.to_path_buf(),
        source,
    };
    let mut head = Vec::new();
    File::open(kernel)
        .map_err(open_err)?
        .take(multiboot::MULTIBOOT_SEARCH as u64)
        .read_to_end(&mut head)
        .map_err(open_err)?;
    let not_bz = |what: HeaderProblem| BootError::NotBzImageHeader {
        path: kernel.to_path_buf(),
        what,
    };
    if head.get(HDR_MAGIC_OFFSET..HDR_MAGIC_OFFSET + 4) != Some(b"HdrS") {
        let format = match multiboot::find_header(&head) {
            Ok(Some(header)) => KernelFormat::Multiboot(header),
            Ok(None) => {
                return Err(BootError::NotBootable {
                    path: kernel.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(BootError::Multiboot {
                    path: kernel.to_path_buf(),
                    source,
                })
            }
        };
        check_initramfs(initramfs)?;
        return Ok(format);
    }
    if head.len() < 0x400 {
        return Err(not_bz(HeaderProblem::TooShort));
    }
    let [minor, major] = [head[HDR_VERSION_OFFSET], head[HDR_VERSION_OFFSET + 1]];
    // 2.06 is the first protocol with cmdline_size and the 64-bit entry comes with 2.12.
    if u16::from_le_bytes([minor, major]) < 0x020c {
        return Err(not_bz(HeaderProblem::OldProtocol { major, minor }));
    }
    if head[HDR_LOADFLAGS_OFFSET] & 1 == 0 {
        return Err(not_bz(HeaderProblem::NotLoadedHigh));
    }
    check_initramfs(initramfs)?;
    Ok(KernelFormat::BzImage)
}

fn check_initramfs(initramfs: Option<&Path>) -> Result<(), BootError> {
    if let Some(path) = initramfs {
        File::open(path).map_err(|source| BootError::Initramfs {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// Loads the multiboot kernel at `kernel` (its `header` from [`check_boot_files`]) with
/// `initramfs` as its one module, and writes the boot information: the memory map is our e820
/// map, the command line the kernel's path followed by `args`.
pub fn load_multiboot(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel: &Path,
    header: &MultibootHeader,
    initramfs: Option<&Path>,
    args: &str,
) -> Result<MultibootEntry, BootError> {
    let image = std::fs::read(kernel).map_err(|source| BootError::OpenKernel {
        path: kernel.to_path_buf(),
        source,
    })?;
    let module_data = match initramfs {
        Some(path) => Some(std::fs::read(path).map_err(|source| BootError::Initramfs {
            path: path.to_path_buf(),
            source,
        })?),
        None => None,
    };
    let module_name = initramfs.map(|p| p.display().to_string());
    let modules: Vec<multiboot::Module> = match (&module_data, &module_name) {
        (Some(data), Some(name)) => vec![multiboot::Module {
            data,
            cmdline: name,
        }],
        _ => Vec::new(),
    };
    let map = e820_map(ram_size);
    let cmdline = multiboot::kernel_cmdline(&kernel.display().to_string(), args);
    multiboot::load(
        mem,
        &image,
        header,
        &multiboot::BootParams {
            cmdline: &cmdline,
            modules: &modules,
            memory_map: &map,
        },
    )
    .map_err(|source| BootError::Multiboot {
        path: kernel.to_path_buf(),
        source,
    })
}

/// Real-mode code at the reset vector: `mov al, 0xfe; out 0x64, al; hlt; jmp $-1`, an i8042
/// reset pulse. Linux on hardware-reduced ACPI without EFI reboots through BOOT_EFI then
/// BOOT_BIOS (arch/x86/kernel/reboot.c), i.e. it jumps to F000:FFF0 expecting firmware to
/// reset the machine; with nothing there it would run zeros forever.
pub const RESET_STUB: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// Writes [`RESET_STUB`] at the reset vector (inside the e820 hole, so the guest keeps it).
pub fn write_reset_stub(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    use vm_memory::Bytes;
    mem.write_slice(&RESET_STUB, GuestAddress(RESET_VECTOR))
        .map_err(BootError::ResetStub)
}

/// Where a Linux guest starts.
#[derive(Clone, Copy, Debug)]
pub struct LinuxEntry {
    /// 64-bit entry point (startup_64).
    pub entry: u64,
}

/// Loads kernel, initramfs and command line, writes the zero page. `rsdp` is the ACPI RSDP
/// address passed through boot_params.acpi_rsdp_addr.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<LinuxEntry, BootError> {
    let mut kernel_file = File::open(kernel).map_err(|source| BootError::OpenKernel {
        path: kernel.to_path_buf(),
        source,
    })?;
    let loaded = BzImage::load(mem, None, &mut kernel_file, Some(GuestAddress(HIMEM_START)))
        .map_err(|source| BootError::NotBzImage {
            path: kernel.to_path_buf(),
            source,
        })?;
    // The loader always returns a header for bzImages; its absence means a loader bug.
    let mut hdr = loaded.setup_header.unwrap_or_default();

    let cl = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE).map_err(|source| BootError::Cmdline {
        len: cmdline.len(),
        max: CMDLINE_MAX_SIZE - 1,
        source,
    })?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(BootError::WriteCmdline)?;

    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline.len() as u32 + 1;
    hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;

    if let Some(path) = initramfs {
        let low_end = ram_size.min(MEM_32BIT_GAP_START);
        // initrd_addr_max is the highest address the initrd may occupy (inclusive).
        let max = if hdr.initrd_addr_max == 0 {
            0x37ff_ffff
        } else {
            u64::from(hdr.initrd_addr_max)
        };
        let limit = low_end.min(max + 1);
        let (addr, size) = load_initramfs(mem, path, loaded.kernel_end, limit)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    let map = e820_map(ram_size);
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootError::E820TooLong(map.len()));
    }
    for (i, e) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::ZeroPage)?;

    Ok(LinuxEntry {
        entry: loaded.kernel_load.0 + STARTUP_64_OFFSET,
    })
}

/// Places the initramfs page-aligned at the top of memory below `limit`, above `kernel_end`.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let io_err = |source| BootError::Initramfs {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    let too_big = BootError::InitramfsTooBig {
        path: path.to_path_buf(),
        size,
        limit,
    };
    let addr = match limit.checked_sub(size) {
        Some(a) => a & !0xfff,
        None => return Err(too_big),
    };
    if addr < kernel_end {
        return Err(too_big);
    }
    let mut slice = mem
        .get_slice(GuestAddress(addr), size as usize)
        .map_err(|_| BootError::InitramfsTooBig {
            path: path.to_path_buf(),
            size,
            limit,
        })?;
    file.read_exact_volatile(&mut slice)
        .map_err(|e| io_err(std::io::Error::other(e)))?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn e820_small_guest() {
        let m = e820_map(256 << 20);
        assert_eq!(
            m[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(
            m[1],
            E820Entry {
                addr: 0x10_0000,
                size: (256 << 20) - 0x10_0000,
                kind: E820_RAM
            }
        );
        assert_eq!(m[2].kind, E820_RESERVED);
        assert_eq!(m[2].addr, PCI_ECAM_START);
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn e820_large_guest_splits_at_hole() {
        let m = e820_map(4 << 30);
        let ram: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Everything but the 1 MiB legacy area (minus conventional memory) is RAM.
        assert_eq!(ram, (4 << 30) - (HIMEM_START - EBDA_START));
        assert!(m.iter().any(|e| e.addr == 1 << 32 && e.size == 1 << 30));
        assert!(m.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr));
    }

    #[test]
    fn non_bzimage_kernel_is_rejected() {
        let dir = std::env::temp_dir().join(format!("vmm-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("not-a-kernel");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&[0u8; 8192])
            .unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let err = load_linux(&mem, 64 << 20, &path, None, "console=ttyS0", 0).unwrap_err();
        assert!(err.to_string().contains("is not a bzImage"), "{err}");
        let err = load_linux(&mem, 64 << 20, &dir.join("missing"), None, "", 0).unwrap_err();
        assert!(err.to_string().starts_with("cannot open kernel"), "{err}");
        let err = check_boot_files(&path, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "kernel {} is neither a bzImage (no 'HdrS' magic at offset 0x202) nor a \
                 multiboot kernel (no 32-bit aligned header with magic 0x1badb002 and a valid \
                 checksum in the first 8192 bytes)",
                path.display()
            )
        );
        let mut fake = vec![0u8; 0x400];
        fake[0x202..0x206].copy_from_slice(b"HdrS");
        fake[0x206] = 0x0f;
        fake[0x207] = 0x02;
        std::fs::write(&path, &fake).unwrap();
        let err = check_boot_files(&path, None).unwrap_err();
        assert!(
            err.to_string().ends_with("not loaded high (a zImage)"),
            "{err}"
        );
        fake[0x211] = 1;
        std::fs::write(&path, &fake).unwrap();
        assert_eq!(
            check_boot_files(&path, None).unwrap(),
            KernelFormat::BzImage
        );
        // A bzImage header cut short.
        std::fs::write(&path, &fake[..0x300]).unwrap();
        let err = check_boot_files(&path, None).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("file too short for a setup header"),
            "{err}"
        );
        std::fs::write(&path, &fake).unwrap();
        let err = check_boot_files(&path, Some(&dir.join("no-initrd"))).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot read initramfs"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A multiboot header with `flags` after `pad` bytes.
    fn multiboot_image(pad: usize, flags: u32) -> Vec<u8> {
        let magic = multiboot::MULTIBOOT_HEADER_MAGIC;
        let mut img = vec![0u8; pad];
        for w in [magic, flags, 0u32.wrapping_sub(magic.wrapping_add(flags))] {
            img.extend_from_slice(&w.to_le_bytes());
        }
        img
    }

    #[test]
    fn multiboot_kernels_are_told_from_bzimages() {
        let dir = std::env::temp_dir().join(format!("vmm-boot-mb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kernel.flat");
        std::fs::write(&path, multiboot_image(0x100, 0)).unwrap();
        let format = check_boot_files(&path, None).unwrap();
        assert!(
            matches!(format, KernelFormat::Multiboot(h) if h.offset == 0x100),
            "{format:?}"
        );
        assert_eq!(format.default_cmdline(), "");
        assert_eq!(
            KernelFormat::BzImage.default_cmdline(),
            crate::config::DEFAULT_CMDLINE
        );
        let err = check_boot_files(&path, Some(&dir.join("no-env"))).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot read initramfs"),
            "{err}"
        );
        // A header asking for a video mode: refused, saying why.
        std::fs::write(&path, multiboot_image(0, 1 << 2)).unwrap();
        let err = check_boot_files(&path, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("requirement bits 0x4 are not supported"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
