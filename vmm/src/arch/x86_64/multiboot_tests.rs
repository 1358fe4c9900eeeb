use super::*;
use crate::arch::x86_64::boot::{e820_map, E820_RESERVED};
use crate::arch::x86_64::elf::tests::build as build_elf;
use crate::arch::x86_64::layout::ram_regions;

const RAM: u64 = 64 << 20;

fn memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(RAM)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

/// A multiboot header with `flags` and a correct checksum.
fn header(flags: u32) -> Vec<u8> {
    let mut h = Vec::new();
    for w in [
        MULTIBOOT_HEADER_MAGIC,
        flags,
        0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC.wrapping_add(flags)),
    ] {
        h.extend_from_slice(&w.to_le_bytes());
    }
    h
}

/// An ELF32 kernel as kvm-unit-tests builds them: text with the header at 4 MiB, then data
/// with a bss.
fn kut_like_elf() -> Vec<u8> {
    let mut text = header(0);
    text.extend_from_slice(&[0x90; 20]);
    build_elf(
        false,
        0x40_000c,
        &[
            (0x40_0000, &text, text.len() as u64),
            (0x40_1000, b"data", 0x3000),
        ],
    )
}

fn u32_at(mem: &GuestMemoryMmap, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn u64_at(mem: &GuestMemoryMmap, addr: u64) -> u64 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn c_string(mem: &GuestMemoryMmap, addr: u64) -> String {
    let mut s = Vec::new();
    for a in addr.. {
        let b: u8 = mem.read_obj(GuestAddress(a)).unwrap();
        if b == 0 {
            break;
        }
        s.push(b);
    }
    String::from_utf8(s).unwrap()
}

fn load_image(
    mem: &GuestMemoryMmap,
    image: &[u8],
    modules: &[Module],
) -> Result<MultibootEntry, MultibootError> {
    let h = find_header(image)?.ok_or(MultibootError::NoHeader)?;
    let map = e820_map(RAM);
    load(
        mem,
        image,
        &h,
        &BootParams {
            cmdline: &kernel_cmdline("x86/vmexit.flat", "cpuid"),
            modules,
            memory_map: &map,
        },
    )
}

#[test]
fn header_is_found_only_aligned_with_its_checksum_in_the_first_8k() {
    let mut img = vec![0u8; 16];
    img.extend(header(HEADER_PAGE_ALIGN | HEADER_MEMORY_INFO));
    let h = find_header(&img).unwrap().unwrap();
    assert_eq!((h.offset, h.flags, h.addresses), (16, 3, None));

    // Misaligned: not a header.
    let mut img = vec![0u8; 2];
    img.extend(header(0));
    assert_eq!(find_header(&img).unwrap(), None);
    // Bad checksum.
    let mut img = header(0);
    img[8] ^= 1;
    assert_eq!(find_header(&img).unwrap(), None);
    // Past the first 8 KiB.
    let mut img = vec![0u8; MULTIBOOT_SEARCH];
    img.extend(header(0));
    assert_eq!(find_header(&img).unwrap(), None);
    // Ending exactly at 8 KiB still counts.
    let mut img = vec![0u8; MULTIBOOT_SEARCH - HEADER_LEN];
    img.extend(header(0));
    assert!(find_header(&img).unwrap().is_some());
    assert_eq!(find_header(b"").unwrap(), None);
    assert_eq!(find_header(&[0xff; 11]).unwrap(), None);
}

#[test]
fn unmet_requirements_and_truncated_address_fields_are_refused() {
    // Bit 2: a video mode.
    let err = find_header(&header(1 << 2)).unwrap_err();
    assert!(
        matches!(err, MultibootError::UnsupportedFlags { unsupported: 4, .. }),
        "{err}"
    );
    // Bits 16..31 are optional: bit 17 is ignored.
    assert!(find_header(&header(1 << 17)).unwrap().is_some());
    // Address fields announced but missing.
    let err = find_header(&header(HEADER_ADDRESSES)).unwrap_err();
    assert!(matches!(err, MultibootError::TruncatedHeader { offset: 0 }));
}

#[test]
fn elf_kernel_is_loaded_with_its_info_modules_and_memory_map() {
    let mem = memory();
    // Something to overwrite: the bss must come out zero.
    mem.write_slice(&[0xaa; 16], GuestAddress(0x40_1004))
        .unwrap();
    let img = kut_like_elf();
    let env = b"NR_CPUS=1\nMEMSIZE=64\n";
    let entry = load_image(
        &mem,
        &img,
        &[Module {
            data: env,
            cmdline: "/tmp/env",
        }],
    )
    .unwrap();
    assert_eq!(entry.eip, 0x40_000c);
    assert_eq!(u64::from(entry.info_addr), INFO_ADDR);
    assert_eq!(u32_at(&mem, 0x40_0000), MULTIBOOT_HEADER_MAGIC);
    assert_eq!(u32_at(&mem, 0x40_1000), u32::from_le_bytes(*b"data"));
    assert_eq!(u64_at(&mem, 0x40_1004), 0);

    let info = INFO_ADDR;
    let flags = u32_at(&mem, info);
    assert_eq!(flags, 1 | 1 << 2 | 1 << 3 | 1 << 6 | 1 << 9);
    assert_eq!(u32_at(&mem, info + 4), 639, "mem_lower: 0x9fc00 bytes");
    assert_eq!(u32_at(&mem, info + 8), (RAM as u32 - (1 << 20)) >> 10);
    assert_eq!(
        c_string(&mem, u32_at(&mem, info + 16).into()),
        "x86/vmexit.flat cpuid"
    );
    assert_eq!(c_string(&mem, u32_at(&mem, info + 64).into()), "vmm");

    // The module: page-aligned after the kernel's bss (0x40_1000 + 0x3000).
    assert_eq!(u32_at(&mem, info + 20), 1);
    let m = u64::from(u32_at(&mem, info + 24));
    let (start, end) = (u32_at(&mem, m), u32_at(&mem, m + 4));
    assert_eq!(start, 0x40_4000);
    assert_eq!(end - start, env.len() as u32);
    let mut read = vec![0u8; env.len()];
    mem.read_slice(&mut read, GuestAddress(start.into()))
        .unwrap();
    assert_eq!(read, env);
    assert_eq!(c_string(&mem, u32_at(&mem, m + 8).into()), "/tmp/env");

    // The memory map is the e820 map, entry by entry.
    let map = e820_map(RAM);
    assert_eq!(u32_at(&mem, info + 44), 24 * map.len() as u32);
    let mmap = u64::from(u32_at(&mem, info + 48));
    for (i, e) in map.iter().enumerate() {
        let at = mmap + 24 * i as u64;
        assert_eq!(u32_at(&mem, at), 20);
        assert_eq!(u64_at(&mem, at + 4), e.addr);
        assert_eq!(u64_at(&mem, at + 12), e.size);
        assert_eq!(u32_at(&mem, at + 20), e.kind);
    }
    assert!(map.iter().any(|e| e.kind == E820_RESERVED));
}

#[test]
fn elf64_kernels_load_like_elf32_ones() {
    let mem = memory();
    let mut text = header(0);
    text.extend_from_slice(b"code");
    let img = build_elf(true, 0x20_0000, &[(0x20_0000, &text, text.len() as u64)]);
    let entry = load_image(&mem, &img, &[]).unwrap();
    assert_eq!(entry.eip, 0x20_0000);
    assert_eq!(
        u32_at(&mem, u64::from(entry.info_addr) + 20),
        0,
        "no modules"
    );
}

#[test]
fn info_moves_out_of_the_way_of_a_low_kernel() {
    // kvm-unit-tests' realmode.flat loads at 0x8000..0xda30, over QEMU's 0x9000.
    let mem = memory();
    let mut text = header(0);
    text.resize(0x2800, 0x90);
    let img = build_elf(
        false,
        0x8000,
        &[(0x8000, &text, 0x2800), (0xb000, b"d", 0x2a30)],
    );
    let entry = load_image(&mem, &img, &[]).unwrap();
    let info = u64::from(entry.info_addr);
    assert!(info >= LOW_LIMIT);
    assert!(info + INFO_LEN <= 0x8000 || info >= 0xda30, "{info:#x}");
    assert_eq!(u32_at(&mem, info + 4), 639);
}

#[test]
fn aout_kludge_loads_the_file_from_the_header_fields() {
    let mem = memory();
    // header_addr = load_addr + 8: the file's first byte loads at load_addr.
    let load_addr = 0x10_0000u32;
    let mut img = vec![0xeb, 0xfe, 0, 0, 0, 0, 0, 0];
    img.extend(header(HEADER_ADDRESSES));
    for w in [load_addr + 8, load_addr, 0, load_addr + 0x2000, load_addr] {
        img.extend_from_slice(&w.to_le_bytes());
    }
    img.extend_from_slice(b"tail");
    mem.write_slice(&[0x55; 4], GuestAddress(u64::from(load_addr) + 0x1ffc))
        .unwrap();
    let entry = load_image(&mem, &img, &[]).unwrap();
    assert_eq!(entry.eip, load_addr);
    let mut read = vec![0u8; img.len()];
    mem.read_slice(&mut read, GuestAddress(load_addr.into()))
        .unwrap();
    assert_eq!(read, img);
    assert_eq!(u32_at(&mem, u64::from(load_addr) + 0x1ffc), 0, "bss zeroed");

    // Fields: header_addr at 20, load_addr 24, load_end_addr 28, bss_end_addr 32.
    let with = |at: usize, v: u32| {
        let mut b = img.clone();
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        b
    };
    for (bad, msg) in [
        (
            with(24, load_addr + 0x100),
            "header_addr is below load_addr",
        ),
        (with(24, load_addr - 0x100), "before the start of the file"),
        (with(28, load_addr + 0x1000), "past the end of the file"),
        (with(28, load_addr - 1), "load_end_addr is below load_addr"),
        (with(32, load_addr + 4), "bss_end_addr is below"),
    ] {
        let err = load_image(&mem, &bad, &[]).unwrap_err();
        assert!(err.to_string().contains(msg), "{err}");
    }
}

#[test]
fn segments_modules_and_entries_outside_ram_are_errors() {
    let mem = memory();
    let mut text = header(0);
    text.extend_from_slice(b"code");
    let len = text.len() as u64;
    // In the legacy hole, past the end of RAM, above 4 GiB.
    for addr in [0xa_0000, RAM - 4, 0x1_0000_0000] {
        let img = build_elf(true, 0x10_0000, &[(addr, &text, len)]);
        let err = load_image(&mem, &img, &[]).unwrap_err();
        assert!(
            matches!(err, MultibootError::SegmentOutsideRam { addr: a, .. } if a == addr),
            "{err}"
        );
    }
    let img = build_elf(true, 0x1_0000_0000, &[(0x10_0000, &text, len)]);
    assert!(matches!(
        load_image(&mem, &img, &[]).unwrap_err(),
        MultibootError::EntryAbove4G(0x1_0000_0000)
    ));
    let img = build_elf(false, 0x10_0000, &[(0x10_0000, &text, len)]);
    let big = vec![0u8; RAM as usize];
    let err = load_image(
        &mem,
        &img,
        &[Module {
            data: &big,
            cmdline: "big",
        }],
    )
    .unwrap_err();
    assert!(
        matches!(err, MultibootError::ModuleDoesNotFit { index: 0, .. }),
        "{err}"
    );
    // Not ELF and no address fields.
    let err = load_image(&mem, &header(0), &[]).unwrap_err();
    assert!(
        matches!(err, MultibootError::Elf(ElfError::NoMagic)),
        "{err}"
    );
}

#[test]
fn command_line_is_the_name_then_the_arguments() {
    assert_eq!(kernel_cmdline("x86/setjmp.flat", ""), "x86/setjmp.flat");
    assert_eq!(kernel_cmdline("k", "a b"), "k a b");
}
