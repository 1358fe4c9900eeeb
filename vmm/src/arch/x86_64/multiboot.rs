//! Multiboot (version 1, specification 0.6.96) kernels, as GRUB legacy and QEMU's `-kernel`
//! boot them: find the header, load the ELF segments (or the a.out-kludge range), place the
//! modules, write the boot information, and say where the vCPU starts (3.2 "Machine state":
//! 32-bit protected mode, paging off, EAX = [`MULTIBOOT_BOOTLOADER_MAGIC`], EBX = the info).
//!
//! kvm-unit-tests' `.flat` files are such kernels (ELF32 with the header in `.init`); they read
//! the memory fields, the memory map, the command line (its first word is the kernel's name, as
//! GRUB and QEMU pass it) and the first module (their environment file).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::{E820Entry, E820_RAM};
use super::elf::{self, ElfError};
use super::layout::HIMEM_START;

/// The header's magic (3.1.2).
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1bad_b002;
/// EAX at the kernel's entry (3.2).
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header lies, 32-bit aligned, within the image's first 8192 bytes (3.1.1).
pub const MULTIBOOT_SEARCH: usize = 8192;
/// The boot loader name we report (info field `boot_loader_name`).
pub const BOOT_LOADER_NAME: &str = "vmm";

// Header flags (3.1.2). Bits 0-15 are requirements: a loader that cannot meet one refuses the
// image. We always page-align modules (bit 0) and always pass memory information (bit 1);
// bit 2 (a video mode) we cannot give: there is no display.
const HEADER_PAGE_ALIGN: u32 = 1 << 0;
const HEADER_MEMORY_INFO: u32 = 1 << 1;
const HEADER_REQUIREMENTS: u32 = 0xffff;
/// Bit 16: the header's address fields say where to load the image (the "a.out kludge").
const HEADER_ADDRESSES: u32 = 1 << 16;
/// magic, flags, checksum.
const HEADER_LEN: usize = 12;
/// ... then header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr.
const HEADER_WITH_ADDRESSES_LEN: usize = 32;

// Boot information flags (3.3).
const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MEM_MAP: u32 = 1 << 6;
const INFO_BOOT_LOADER_NAME: u32 = 1 << 9;
// Boot information field offsets (3.3).
const INFO_FLAGS: u64 = 0;
const INFO_MEM_LOWER: u64 = 4;
const INFO_MEM_UPPER: u64 = 8;
const INFO_CMDLINE_PTR: u64 = 16;
const INFO_MODS_COUNT: u64 = 20;
const INFO_MODS_ADDR: u64 = 24;
const INFO_MMAP_LENGTH: u64 = 44;
const INFO_MMAP_ADDR: u64 = 48;
const INFO_BOOT_LOADER_NAME_PTR: u64 = 64;
/// The structure through the framebuffer fields is 116 bytes; rounded for the entries after it.
const INFO_LEN: u64 = 120;
/// A memory map entry: size (of the rest, 20), base_addr, length, type.
const MMAP_ENTRY_LEN: u64 = 24;
const MMAP_ENTRY_SIZE_FIELD: u32 = 20;
/// A module entry: mod_start, mod_end, string, reserved.
const MODULE_ENTRY_LEN: u64 = 16;

/// Where QEMU puts the boot information (hw/i386/multiboot.c): low memory that kernels loaded
/// at 1 MiB and up leave alone. Used when the image does not cover it.
pub const INFO_ADDR: u64 = 0x9000;
/// Page 0 holds the real-mode IVT and is where kvm-unit-tests copies its SMP trampoline: the
/// information never goes there.
const LOW_LIMIT: u64 = 0x1000;
const PAGE_SIZE: u64 = 0x1000;
/// The kernel runs with 32-bit addresses.
const LIMIT_4G: u64 = 1 << 32;

/// Errors loading a multiboot kernel; each names the field or range at fault.
#[derive(Debug, thiserror::Error)]
pub enum MultibootError {
    /// The header asks for something we cannot give.
    #[error(
        "multiboot header at offset {offset:#x} has flags {flags:#x}: requirement bits \
         {unsupported:#x} are not supported (only page alignment and memory information are)"
    )]
    UnsupportedFlags {
        offset: usize,
        flags: u32,
        unsupported: u32,
    },
    /// The address fields do not fit in the first 8 KiB or the file.
    #[error("multiboot header at offset {offset:#x} has address fields past the first {MULTIBOOT_SEARCH} bytes or the end of the file")]
    TruncatedHeader { offset: usize },
    /// The address fields contradict each other or the file.
    #[error("multiboot address fields: {what} (header_addr {header_addr:#x}, load_addr {load_addr:#x}, load_end_addr {load_end_addr:#x}, bss_end_addr {bss_end_addr:#x})")]
    BadAddresses {
        what: &'static str,
        header_addr: u32,
        load_addr: u32,
        load_end_addr: u32,
        bss_end_addr: u32,
    },
    /// No multiboot header where [`load`] expected one.
    #[error("no multiboot header (magic {MULTIBOOT_HEADER_MAGIC:#x} with a valid checksum) in the first {MULTIBOOT_SEARCH} bytes")]
    NoHeader,
    /// Without address fields, the image must be an ELF executable.
    #[error("the image has no multiboot address fields and is not a loadable ELF executable: {0}")]
    Elf(#[from] ElfError),
    /// A segment lies outside guest RAM below 4 GiB.
    #[error("segment {addr:#x}+{len:#x} is not inside guest RAM below 4 GiB")]
    SegmentOutsideRam { addr: u64, len: u64 },
    /// The entry point is not a 32-bit address.
    #[error("entry point {0:#x} is above 4 GiB")]
    EntryAbove4G(u64),
    /// A module does not fit after the kernel.
    #[error("module {index} ({len} bytes) does not fit in guest RAM below 4 GiB at {addr:#x}; give more --memory")]
    ModuleDoesNotFit { index: usize, len: usize, addr: u64 },
    /// No room for the boot information.
    #[error("no room in guest RAM below 4 GiB for the multiboot information ({len} bytes)")]
    NoRoomForInfo { len: u64 },
    /// Guest memory write failed.
    #[error("cannot write {what} to guest memory at {addr:#x}: {source}")]
    Write {
        what: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// The optional address fields (3.1.3), valid when flags bit 16 is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressFields {
    /// Physical address the header itself is loaded to.
    pub header_addr: u32,
    /// Physical address of the start of the text segment.
    pub load_addr: u32,
    /// End of the data segment; 0: the rest of the file.
    pub load_end_addr: u32,
    /// End of the bss, zeroed by the loader; 0: no bss.
    pub bss_end_addr: u32,
    /// Entry point.
    pub entry_addr: u32,
}

/// A multiboot header found in an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultibootHeader {
    /// File offset of the magic.
    pub offset: usize,
    /// The header's flags.
    pub flags: u32,
    /// The address fields, when flags bit 16 says they are valid.
    pub addresses: Option<AddressFields>,
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let w = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
}

/// Looks for a multiboot header: the magic at a 32-bit aligned offset of the first 8 KiB, with
/// magic + flags + checksum = 0 (mod 2^32). `Ok(None)`: not a multiboot image. An error: the
/// header is there but asks for what we cannot do.
pub fn find_header(image: &[u8]) -> Result<Option<MultibootHeader>, MultibootError> {
    let head = &image[..image.len().min(MULTIBOOT_SEARCH)];
    let found = (0..head.len())
        .step_by(4)
        .take_while(|&o| o + HEADER_LEN <= head.len())
        .find_map(|offset| {
            let magic = le32(head, offset)?;
            let flags = le32(head, offset + 4)?;
            let checksum = le32(head, offset + 8)?;
            let valid = magic == MULTIBOOT_HEADER_MAGIC
                && magic.wrapping_add(flags).wrapping_add(checksum) == 0;
            valid.then_some((offset, flags))
        });
    let Some((offset, flags)) = found else {
        return Ok(None);
    };
    let unsupported = flags & HEADER_REQUIREMENTS & !(HEADER_PAGE_ALIGN | HEADER_MEMORY_INFO);
    if unsupported != 0 {
        return Err(MultibootError::UnsupportedFlags {
            offset,
            flags,
            unsupported,
        });
    }
    let addresses = if flags & HEADER_ADDRESSES != 0 {
        if offset + HEADER_WITH_ADDRESSES_LEN > head.len() {
            return Err(MultibootError::TruncatedHeader { offset });
        }
        let field = |i: usize| le32(head, offset + HEADER_LEN + 4 * i).unwrap_or(0);
        Some(AddressFields {
            header_addr: field(0),
            load_addr: field(1),
            load_end_addr: field(2),
            bss_end_addr: field(3),
            entry_addr: field(4),
        })
    } else {
        None
    };
    Ok(Some(MultibootHeader {
        offset,
        flags,
        addresses,
    }))
}

/// A module to load after the kernel.
#[derive(Clone, Copy, Debug)]
pub struct Module<'a> {
    /// Its bytes.
    pub data: &'a [u8],
    /// Its string (by convention its file name, then its arguments).
    pub cmdline: &'a str,
}

/// What the boot information describes.
#[derive(Clone, Copy, Debug)]
pub struct BootParams<'a> {
    /// The kernel's command line. Multiboot loaders pass the kernel's name as its first word
    /// (kvm-unit-tests takes the second word on as its arguments): see [`kernel_cmdline`].
    pub cmdline: &'a str,
    /// Modules, in order.
    pub modules: &'a [Module<'a>],
    /// The guest's memory map; its RAM entries bound where anything is loaded.
    pub memory_map: &'a [E820Entry],
}

/// The command line a multiboot kernel gets: its name, then `args` if any (as QEMU's
/// `-kernel NAME -append ARGS` and GRUB's `kernel NAME ARGS` give it).
pub fn kernel_cmdline(name: &str, args: &str) -> String {
    if args.is_empty() {
        name.to_string()
    } else {
        format!("{name} {args}")
    }
}

/// Where and how the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultibootEntry {
    /// EIP.
    pub eip: u32,
    /// EBX: the boot information's address (EAX is [`MULTIBOOT_BOOTLOADER_MAGIC`]).
    pub info_addr: u32,
}

/// A range to copy into guest memory, zero-filled up to `memsz`.
struct Piece<'a> {
    addr: u64,
    bytes: &'a [u8],
    memsz: u64,
}

/// What the image asks to load, by its address fields or else its ELF program headers.
fn plan<'a>(
    image: &'a [u8],
    header: &MultibootHeader,
) -> Result<(u64, Vec<Piece<'a>>), MultibootError> {
    let Some(a) = header.addresses else {
        let exe = elf::parse(image)?;
        let pieces = exe
            .segments
            .into_iter()
            .map(|s| Piece {
                addr: s.addr,
                bytes: &image[s.file],
                memsz: s.memsz,
            })
            .collect();
        return Ok((exe.entry, pieces));
    };
    let bad = |what| MultibootError::BadAddresses {
        what,
        header_addr: a.header_addr,
        load_addr: a.load_addr,
        load_end_addr: a.load_end_addr,
        bss_end_addr: a.bss_end_addr,
    };
    // The file offset that loads at load_addr: the header sits header_addr - load_addr in.
    let header_delta = a
        .header_addr
        .checked_sub(a.load_addr)
        .ok_or_else(|| bad("header_addr is below load_addr"))?;
    let start = header
        .offset
        .checked_sub(header_delta as usize)
        .ok_or_else(|| bad("load_addr lies before the start of the file"))?;
    let load_len = if a.load_end_addr == 0 {
        image.len() - start
    } else {
        let len = a
            .load_end_addr
            .checked_sub(a.load_addr)
            .ok_or_else(|| bad("load_end_addr is below load_addr"))? as usize;
        if start + len > image.len() {
            return Err(bad("load_end_addr lies past the end of the file"));
        }
        len
    };
    let memsz = if a.bss_end_addr == 0 {
        load_len as u64
    } else {
        let end = u64::from(a.bss_end_addr);
        let loaded_end = u64::from(a.load_addr) + load_len as u64;
        if end < loaded_end {
            return Err(bad("bss_end_addr is below the end of the loaded data"));
        }
        end - u64::from(a.load_addr)
    };
    let piece = Piece {
        addr: u64::from(a.load_addr),
        bytes: &image[start..start + load_len],
        memsz,
    };
    Ok((u64::from(a.entry_addr), vec![piece]))
}

/// Whether `addr..addr+len` lies inside one RAM entry of `map`, below 4 GiB.
fn in_low_ram(map: &[E820Entry], addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    end <= LIMIT_4G
        && map
            .iter()
            .any(|e| e.kind == E820_RAM && e.addr <= addr && end <= e.addr + e.size)
}

fn overlaps(used: &[(u64, u64)], addr: u64, len: u64) -> bool {
    used.iter().any(|&(a, l)| addr < a + l && a < addr + len)
}

fn write(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), MultibootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| MultibootError::Write { what, addr, source })
}

fn write_zeros(
    mem: &GuestMemoryMmap,
    what: &'static str,
    mut addr: u64,
    mut len: u64,
) -> Result<(), MultibootError> {
    let zeros = [0u8; PAGE_SIZE as usize];
    while len > 0 {
        let n = len.min(PAGE_SIZE);
        write(mem, what, addr, &zeros[..n as usize])?;
        addr += n;
        len -= n;
    }
    Ok(())
}

/// mem_lower and mem_upper (3.3): KiB of RAM from 0 (at most 640) and from 1 MiB up to the
/// first hole.
fn memory_fields(map: &[E820Entry]) -> (u32, u32) {
    let ram = |at: u64| {
        map.iter()
            .find(|e| e.kind == E820_RAM && e.addr <= at && at < e.addr + e.size)
            .map(|e| e.addr + e.size - at)
            .unwrap_or(0)
    };
    let lower = ram(0).min(640 << 10) >> 10;
    let upper = ram(HIMEM_START).min(LIMIT_4G - HIMEM_START) >> 10;
    (lower as u32, upper as u32)
}

/// The first of: [`INFO_ADDR`], then any page from [`LOW_LIMIT`] up that starts a free spot
/// after something in `used`, where `len` bytes fit in RAM below 4 GiB without touching `used`.
fn place_info(map: &[E820Entry], used: &[(u64, u64)], len: u64) -> Option<u64> {
    let mut candidates: Vec<u64> = used
        .iter()
        .map(|&(a, l)| (a + l).next_multiple_of(PAGE_SIZE))
        .chain([LOW_LIMIT])
        .chain(map.iter().filter(|e| e.kind == E820_RAM).map(|e| e.addr))
        .map(|a| a.max(LOW_LIMIT))
        .collect();
    candidates.sort_unstable();
    std::iter::once(INFO_ADDR)
        .chain(candidates)
        .find(|&a| in_low_ram(map, a, len) && !overlaps(used, a, len))
}

/// Loads the multiboot kernel `image` (with `header`, from [`find_header`]) and its modules into
/// `mem`, writes the boot information, and returns the entry state.
pub fn load(
    mem: &GuestMemoryMmap,
    image: &[u8],
    header: &MultibootHeader,
    params: &BootParams,
) -> Result<MultibootEntry, MultibootError> {
    let map = params.memory_map;
    let (entry, pieces) = plan(image, header)?;
    let eip = u32::try_from(entry).map_err(|_| MultibootError::EntryAbove4G(entry))?;
    let mut used = Vec::new();
    for p in &pieces {
        if !in_low_ram(map, p.addr, p.memsz) {
            return Err(MultibootError::SegmentOutsideRam {
                addr: p.addr,
                len: p.memsz,
            });
        }
        write(mem, "a kernel segment", p.addr, p.bytes)?;
        write_zeros(
            mem,
            "a kernel segment's bss",
            p.addr + p.bytes.len() as u64,
            p.memsz - p.bytes.len() as u64,
        )?;
        used.push((p.addr, p.memsz));
    }

    // Modules go page-aligned after the kernel, in upper memory (as QEMU and GRUB place them).
    let kernel_end = used
        .iter()
        .map(|&(a, l)| a + l)
        .max()
        .unwrap_or(HIMEM_START);
    let mut next = kernel_end.max(HIMEM_START).next_multiple_of(PAGE_SIZE);
    let mut module_ranges = Vec::new();
    for (index, m) in params.modules.iter().enumerate() {
        let len = m.data.len() as u64;
        if !in_low_ram(map, next, len) {
            return Err(MultibootError::ModuleDoesNotFit {
                index,
                len: m.data.len(),
                addr: next,
            });
        }
        write(mem, "a module", next, m.data)?;
        module_ranges.push((next, len));
        used.push((next, len.max(1)));
        next = (next + len).next_multiple_of(PAGE_SIZE);
    }

    // The information block: the structure, the memory map, the module list, then strings.
    let strings: Vec<&str> = [params.cmdline, BOOT_LOADER_NAME]
        .into_iter()
        .chain(params.modules.iter().map(|m| m.cmdline))
        .collect();
    let mmap_len = MMAP_ENTRY_LEN * map.len() as u64;
    let mods_len = MODULE_ENTRY_LEN * params.modules.len() as u64;
    let strings_len: u64 = strings.iter().map(|s| s.len() as u64 + 1).sum();
    let len = INFO_LEN + mmap_len + mods_len + strings_len;
    let info = place_info(map, &used, len).ok_or(MultibootError::NoRoomForInfo { len })?;
    let mmap_addr = info + INFO_LEN;
    let mods_addr = mmap_addr + mmap_len;
    let mut string_addrs = Vec::new();
    let mut at = mods_addr + mods_len;
    for s in &strings {
        let mut bytes = s.as_bytes().to_vec();
        bytes.push(0);
        write(mem, "a boot information string", at, &bytes)?;
        string_addrs.push(at);
        at += bytes.len() as u64;
    }

    let mut block = vec![0u8; (INFO_LEN + mmap_len + mods_len) as usize];
    let mut put = |off: u64, v: &[u8]| {
        block[off as usize..off as usize + v.len()].copy_from_slice(v);
    };
    let (mem_lower, mem_upper) = memory_fields(map);
    let flags = INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MEM_MAP | INFO_BOOT_LOADER_NAME;
    // Every address below is under 4 GiB: `place_info` and `in_low_ram` saw to it.
    put(INFO_FLAGS, &flags.to_le_bytes());
    put(INFO_MEM_LOWER, &mem_lower.to_le_bytes());
    put(INFO_MEM_UPPER, &mem_upper.to_le_bytes());
    put(INFO_CMDLINE_PTR, &(string_addrs[0] as u32).to_le_bytes());
    put(
        INFO_MODS_COUNT,
        &(params.modules.len() as u32).to_le_bytes(),
    );
    put(INFO_MODS_ADDR, &(mods_addr as u32).to_le_bytes());
    put(INFO_MMAP_LENGTH, &(mmap_len as u32).to_le_bytes());
    put(INFO_MMAP_ADDR, &(mmap_addr as u32).to_le_bytes());
    put(
        INFO_BOOT_LOADER_NAME_PTR,
        &(string_addrs[1] as u32).to_le_bytes(),
    );
    for (i, e) in map.iter().enumerate() {
        let off = INFO_LEN + MMAP_ENTRY_LEN * i as u64;
        put(off, &MMAP_ENTRY_SIZE_FIELD.to_le_bytes());
        put(off + 4, &e.addr.to_le_bytes());
        put(off + 12, &e.size.to_le_bytes());
        // e820 types are multiboot's: 1 available, anything else reserved.
        put(off + 20, &e.kind.to_le_bytes());
    }
    for (i, &(start, len)) in module_ranges.iter().enumerate() {
        let off = INFO_LEN + mmap_len + MODULE_ENTRY_LEN * i as u64;
        put(off, &(start as u32).to_le_bytes());
        put(off + 4, &((start + len) as u32).to_le_bytes());
        put(off + 8, &(string_addrs[2 + i] as u32).to_le_bytes());
    }
    write(mem, "the multiboot information", info, &block)?;

    Ok(MultibootEntry {
        eip,
        info_addr: info as u32,
    })
}

#[cfg(test)]
#[path = "multiboot_tests.rs"]
mod tests;
