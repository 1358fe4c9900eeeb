//! The loadable segments of an ELF executable (System V ABI, "Object Files" and "Program
//! Loading"), as a multiboot loader needs them: 32- or 64-bit, little-endian x86, `PT_LOAD`
//! segments by physical address. The file is untrusted input: every offset and size is checked.

use std::ops::Range;

// ELF identification (System V ABI, "ELF Header", e_ident).
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const EI_CLASS: usize = 4;
const EI_DATA: usize = 5;
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
/// e_type: executable file.
const ET_EXEC: u16 = 2;
/// e_machine: Intel 80386.
const EM_386: u16 = 3;
/// e_machine: AMD x86-64.
const EM_X86_64: u16 = 62;
/// p_type: loadable segment.
const PT_LOAD: u32 = 1;

/// Why an image is not an ELF executable we can load.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    /// No "\x7fELF" at offset 0.
    #[error("no ELF magic at offset 0")]
    NoMagic,
    /// The file ends inside a structure.
    #[error("the file ({len} bytes) ends inside the {what} at offset {offset:#x}")]
    Truncated {
        what: &'static str,
        offset: u64,
        len: usize,
    },
    /// EI_CLASS is neither 32- nor 64-bit.
    #[error("unknown ELF class {0}")]
    Class(u8),
    /// Big-endian or unknown data encoding.
    #[error("ELF data encoding {0} is not little-endian")]
    Encoding(u8),
    /// Not an executable (a relocatable object or shared library).
    #[error("ELF type {0} is not an executable (ET_EXEC)")]
    Type(u16),
    /// Not an x86 machine.
    #[error("ELF machine {0} is neither i386 nor x86-64")]
    Machine(u16),
    /// e_phentsize smaller than a program header of its class.
    #[error("program header size {got} is smaller than {need}")]
    PhentSize { got: u16, need: u16 },
    /// A segment's file image is larger than its memory image.
    #[error("segment {index}: file size {filesz:#x} exceeds memory size {memsz:#x}")]
    FileSizeAboveMemSize { index: u16, filesz: u64, memsz: u64 },
    /// A segment's bytes lie past the end of the file.
    #[error(
        "segment {index}: bytes {offset:#x}+{filesz:#x} lie past the end of the file ({len} bytes)"
    )]
    SegmentPastEnd {
        index: u16,
        offset: u64,
        filesz: u64,
        len: usize,
    },
    /// A segment wraps the physical address space.
    #[error("segment {index}: {addr:#x}+{memsz:#x} wraps the address space")]
    SegmentWraps { index: u16, addr: u64, memsz: u64 },
    /// Nothing to load.
    #[error("no PT_LOAD segment")]
    NoSegments,
}

/// One loadable segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Physical load address (p_paddr).
    pub addr: u64,
    /// The bytes to copy, as a range of the file.
    pub file: Range<usize>,
    /// Bytes in memory (p_memsz); those past the file bytes are zero.
    pub memsz: u64,
}

/// A parsed executable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executable {
    /// e_entry.
    pub entry: u64,
    /// The PT_LOAD segments with a non-empty memory image, in file order.
    pub segments: Vec<Segment>,
}

/// Whether `image` starts with the ELF magic.
pub fn is_elf(image: &[u8]) -> bool {
    image.starts_with(ELF_MAGIC)
}

/// Little-endian field reader over the file, failing with the structure's name.
struct Reader<'a> {
    image: &'a [u8],
}

impl Reader<'_> {
    fn bytes<const N: usize>(&self, what: &'static str, offset: u64) -> Result<[u8; N], ElfError> {
        let truncated = ElfError::Truncated {
            what,
            offset,
            len: self.image.len(),
        };
        let start = usize::try_from(offset).map_err(|_| truncated.clone())?;
        let end = start.checked_add(N).ok_or(truncated.clone())?;
        let b = self.image.get(start..end).ok_or(truncated)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u16(&self, what: &'static str, offset: u64) -> Result<u16, ElfError> {
        self.bytes(what, offset).map(u16::from_le_bytes)
    }

    fn u32(&self, what: &'static str, offset: u64) -> Result<u32, ElfError> {
        self.bytes(what, offset).map(u32::from_le_bytes)
    }

    fn u64(&self, what: &'static str, offset: u64) -> Result<u64, ElfError> {
        self.bytes(what, offset).map(u64::from_le_bytes)
    }
}

/// Field offsets of one ELF class (System V ABI, "ELF Header" and "Program Header").
struct Layout {
    /// Addresses and offsets are 64-bit (ELFCLASS64) rather than 32-bit.
    wide: bool,
    e_entry: u64,
    e_phoff: u64,
    e_phentsize: u64,
    e_phnum: u64,
    phdr_size: u16,
    p_offset: u64,
    p_paddr: u64,
    p_filesz: u64,
    p_memsz: u64,
}

impl Layout {
    /// Reads an address or offset field of this class.
    fn word(&self, r: &Reader, what: &'static str, offset: u64) -> Result<u64, ElfError> {
        if self.wide {
            r.u64(what, offset)
        } else {
            r.u32(what, offset).map(u64::from)
        }
    }
}

const LAYOUT32: Layout = Layout {
    wide: false,
    e_entry: 24,
    e_phoff: 28,
    e_phentsize: 42,
    e_phnum: 44,
    phdr_size: 32,
    p_offset: 4,
    p_paddr: 12,
    p_filesz: 16,
    p_memsz: 20,
};

const LAYOUT64: Layout = Layout {
    wide: true,
    e_entry: 24,
    e_phoff: 32,
    e_phentsize: 54,
    e_phnum: 56,
    phdr_size: 56,
    p_offset: 8,
    p_paddr: 24,
    p_filesz: 32,
    p_memsz: 40,
};

/// Parses `image` as a little-endian x86 executable and lists its loadable segments.
pub fn parse(image: &[u8]) -> Result<Executable, ElfError> {
    if !is_elf(image) {
        return Err(ElfError::NoMagic);
    }
    let r = Reader { image };
    let ident: [u8; 16] = r.bytes("ELF identification", 0)?;
    let l = match ident[EI_CLASS] {
        ELFCLASS32 => &LAYOUT32,
        ELFCLASS64 => &LAYOUT64,
        other => return Err(ElfError::Class(other)),
    };
    if ident[EI_DATA] != ELFDATA2LSB {
        return Err(ElfError::Encoding(ident[EI_DATA]));
    }
    let e_type = r.u16("ELF header", 16)?;
    if e_type != ET_EXEC {
        return Err(ElfError::Type(e_type));
    }
    let machine = r.u16("ELF header", 18)?;
    if machine != EM_386 && machine != EM_X86_64 {
        return Err(ElfError::Machine(machine));
    }
    let entry = l.word(&r, "ELF header", l.e_entry)?;
    let phoff = l.word(&r, "ELF header", l.e_phoff)?;
    let phentsize = r.u16("ELF header", l.e_phentsize)?;
    let phnum = r.u16("ELF header", l.e_phnum)?;
    if phnum > 0 && phentsize < l.phdr_size {
        return Err(ElfError::PhentSize {
            got: phentsize,
            need: l.phdr_size,
        });
    }
    let field = |offset: u64| l.word(&r, "program header", offset);

    let mut segments = Vec::new();
    for index in 0..phnum {
        // Saturating: an offset past the file fails the read below.
        let ph = phoff.saturating_add(u64::from(index) * u64::from(phentsize));
        if r.u32("program header", ph)? != PT_LOAD {
            continue;
        }
        let offset = field(ph.saturating_add(l.p_offset))?;
        let addr = field(ph.saturating_add(l.p_paddr))?;
        let filesz = field(ph.saturating_add(l.p_filesz))?;
        let memsz = field(ph.saturating_add(l.p_memsz))?;
        if memsz == 0 {
            continue;
        }
        if filesz > memsz {
            return Err(ElfError::FileSizeAboveMemSize {
                index,
                filesz,
                memsz,
            });
        }
        let past_end = ElfError::SegmentPastEnd {
            index,
            offset,
            filesz,
            len: image.len(),
        };
        let start = usize::try_from(offset).map_err(|_| past_end.clone())?;
        let end = usize::try_from(filesz)
            .ok()
            .and_then(|n| start.checked_add(n))
            .filter(|&end| end <= image.len())
            .ok_or(past_end)?;
        if addr.checked_add(memsz).is_none() {
            return Err(ElfError::SegmentWraps { index, addr, memsz });
        }
        segments.push(Segment {
            addr,
            file: start..end,
            memsz,
        });
    }
    if segments.is_empty() {
        return Err(ElfError::NoSegments);
    }
    Ok(Executable { entry, segments })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal ELF32 (`class64` false) or ELF64 executable with one PT_LOAD segment
    /// per (paddr, bytes, memsz) entry, the bytes placed after the headers.
    pub(crate) fn build(class64: bool, entry: u64, segs: &[(u64, &[u8], u64)]) -> Vec<u8> {
        let (ehsize, phsize) = if class64 { (64, 56) } else { (52, 32) };
        let mut f = vec![0u8; ehsize + phsize * segs.len()];
        f[..4].copy_from_slice(ELF_MAGIC);
        f[EI_CLASS] = if class64 { ELFCLASS64 } else { ELFCLASS32 };
        f[EI_DATA] = ELFDATA2LSB;
        f[6] = 1; // EI_VERSION
        f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        let machine = if class64 { EM_X86_64 } else { EM_386 };
        f[18..20].copy_from_slice(&machine.to_le_bytes());
        let put = |f: &mut Vec<u8>, at: usize, v: u64| {
            if class64 {
                f[at..at + 8].copy_from_slice(&v.to_le_bytes());
            } else {
                f[at..at + 4].copy_from_slice(&(v as u32).to_le_bytes());
            }
        };
        let l = if class64 { &LAYOUT64 } else { &LAYOUT32 };
        put(&mut f, l.e_entry as usize, entry);
        put(&mut f, l.e_phoff as usize, ehsize as u64);
        f[l.e_phentsize as usize..l.e_phentsize as usize + 2]
            .copy_from_slice(&(phsize as u16).to_le_bytes());
        f[l.e_phnum as usize..l.e_phnum as usize + 2]
            .copy_from_slice(&(segs.len() as u16).to_le_bytes());
        for (i, (addr, bytes, memsz)) in segs.iter().enumerate() {
            let ph = ehsize + i * phsize;
            let offset = f.len() as u64;
            f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
            put(&mut f, ph + l.p_offset as usize, offset);
            put(&mut f, ph + l.p_paddr as usize, *addr);
            put(&mut f, ph + l.p_filesz as usize, bytes.len() as u64);
            put(&mut f, ph + l.p_memsz as usize, *memsz);
            f.extend_from_slice(bytes);
        }
        f
    }

    #[test]
    fn both_classes_list_their_segments() {
        for class64 in [false, true] {
            let f = build(
                class64,
                0x40_00bc,
                &[(0x40_0000, b"code", 4), (0x40_1000, b"dd", 0x100)],
            );
            let exe = parse(&f).unwrap();
            assert_eq!(exe.entry, 0x40_00bc);
            assert_eq!(exe.segments.len(), 2);
            assert_eq!(&f[exe.segments[0].file.clone()], b"code");
            assert_eq!(exe.segments[1].addr, 0x40_1000);
            assert_eq!(exe.segments[1].memsz, 0x100);
            assert_eq!(&f[exe.segments[1].file.clone()], b"dd");
        }
    }

    #[test]
    fn hostile_headers_are_errors() {
        assert_eq!(parse(b"MZ").unwrap_err(), ElfError::NoMagic);
        assert!(matches!(
            parse(b"\x7fELF\x01").unwrap_err(),
            ElfError::Truncated { .. }
        ));
        let good = build(false, 0x1000, &[(0x1000, b"abcd", 4)]);

        let mut f = good.clone();
        f[EI_CLASS] = 3;
        assert_eq!(parse(&f).unwrap_err(), ElfError::Class(3));
        let mut f = good.clone();
        f[EI_DATA] = 2;
        assert_eq!(parse(&f).unwrap_err(), ElfError::Encoding(2));
        let mut f = good.clone();
        f[16] = 1; // ET_REL
        assert_eq!(parse(&f).unwrap_err(), ElfError::Type(1));
        let mut f = good.clone();
        f[18] = 40; // ARM
        assert_eq!(parse(&f).unwrap_err(), ElfError::Machine(40));
        let mut f = good.clone();
        f[42] = 8;
        assert!(matches!(
            parse(&f).unwrap_err(),
            ElfError::PhentSize { got: 8, need: 32 }
        ));

        // filesz > memsz
        let f = build(false, 0x1000, &[(0x1000, b"abcd", 2)]);
        assert!(matches!(
            parse(&f).unwrap_err(),
            ElfError::FileSizeAboveMemSize { .. }
        ));
        // Segment bytes past the end of the file.
        let mut f = good.clone();
        f.truncate(f.len() - 1);
        assert!(matches!(
            parse(&f).unwrap_err(),
            ElfError::SegmentPastEnd { .. }
        ));
        // Program headers past the end of the file.
        let mut f = good.clone();
        f[28..32].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert!(matches!(
            parse(&f).unwrap_err(),
            ElfError::Truncated {
                what: "program header",
                ..
            }
        ));
        // A 64-bit segment wrapping the address space.
        let f = build(true, 0, &[(u64::MAX - 1, b"ab", 2)]);
        assert!(matches!(
            parse(&f).unwrap_err(),
            ElfError::SegmentWraps { .. }
        ));
        // Only empty segments.
        let f = build(false, 0x1000, &[(0x1000, b"", 0)]);
        assert_eq!(parse(&f).unwrap_err(), ElfError::NoSegments);
    }
}
