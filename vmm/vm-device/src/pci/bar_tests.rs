//! Each BAR rule, once.

use super::*;

const RAM: [(u64, u64); 2] = [(0, 0x8000_0000), (0x1_0000_0000, 0x1_4000_0000)];
const MEM: u16 = PCI_COMMAND_MEMORY;
const IO: u16 = PCI_COMMAND_IO;

/// Places BARs at the addresses it holds, in BAR order; fails when it has none left.
struct At(Vec<u64>);

impl BarAllocator for At {
    fn allocate(&mut self, _: BarKind, size: u64) -> Result<u64, AllocError> {
        if self.0.is_empty() {
            return Err(AllocError::Exhausted {
                size,
                align: size,
                start: 0,
                end: 0,
            });
        }
        Ok(self.0.remove(0))
    }

    fn guest_ram(&self) -> Vec<(u64, u64)> {
        RAM.to_vec()
    }
}

/// BAR0 32-bit 1 MiB at 0xc000_0000, BAR1 I/O 32 bytes at 0xc000, BAR2 64-bit prefetchable
/// 16 KiB at 0x2_0000_0000.
fn three() -> Bars {
    let mut b = Bars::new();
    b.declare(0, BarKind::Mmio32, 0x10_0000, false).unwrap();
    b.declare(1, BarKind::Io, 0x20, false).unwrap();
    b.declare(2, BarKind::Mmio64, 0x4000, true).unwrap();
    b.place(&mut At(vec![0xc000_0000, 0xc000, 0x2_0000_0000]))
        .unwrap();
    b
}

fn w32(b: &mut Bars, reg: usize, v: u32, command: u16) -> Option<BarMove> {
    b.write_reg(reg, 0, &v.to_le_bytes(), command)
}

#[test]
fn declared_sizes_round_up_to_a_power_of_two_and_the_kind_minimum() {
    let mut b = Bars::new();
    b.declare(0, BarKind::Mmio32, 0x3000, false).unwrap();
    b.declare(1, BarKind::Io, 1, false).unwrap();
    b.declare(2, BarKind::Mmio32, 4, false).unwrap();
    b.declare(3, BarKind::Io, 0x20, true).unwrap();
    let sizes: Vec<u64> = b.iter().map(|x| x.size).collect();
    assert_eq!(sizes, vec![0x4000, 4, 16, 0x20]);
    assert!(!b.get(3).unwrap().prefetchable, "I/O is never prefetchable");
    assert_eq!(b.get(4), None);
}

#[test]
fn a_header_holds_six_bars_and_a_64_bit_one_takes_two_registers() {
    let mut b = Bars::new();
    assert_eq!(
        b.declare(6, BarKind::Mmio32, 16, false),
        Err(DeclareError::NoSuchBar { index: 6 })
    );
    assert_eq!(
        b.declare(5, BarKind::Mmio64, 16, false),
        Err(DeclareError::NoUpperHalf { index: 5 })
    );
    b.declare(0, BarKind::Mmio64, 16, false).unwrap();
    assert_eq!(
        b.declare(1, BarKind::Mmio32, 16, false),
        Err(DeclareError::Taken { index: 1 }),
        "register 1 is BAR0's upper half"
    );
    b.declare(3, BarKind::Mmio32, 16, false).unwrap();
    assert_eq!(
        b.declare(2, BarKind::Mmio64, 16, false),
        Err(DeclareError::Taken { index: 2 }),
        "its upper half would be BAR3"
    );
}

#[test]
fn discovery_reads_the_type_bits_and_skips_absent_bars_and_upper_halves() {
    // BAR0 64-bit prefetchable, BAR2 I/O, BAR3 absent, BAR4 32-bit, BAR5 claims 64-bit but has
    // no upper half: a 32-bit BAR.
    let raw = [0xc, 0xffff_ffff, 0x1, 0, 0x0, 0x4];
    let size = [0x4000, 0x4000, 0x20, 0, 0x1000, 0x10];
    let b = Bars::discover(|i| raw[i], |i| size[i]);
    let found: Vec<(usize, BarKind, u64, bool)> = b
        .iter()
        .map(|x| (x.index, x.kind, x.size, x.prefetchable))
        .collect();
    assert_eq!(
        found,
        vec![
            (0, BarKind::Mmio64, 0x4000, true),
            (2, BarKind::Io, 0x20, false),
            (4, BarKind::Mmio32, 0x1000, false),
            (5, BarKind::Mmio32, 0x10, false),
        ]
    );
    assert_eq!(b.read_reg(0), 0xc, "type bits before placement");
    assert_eq!(b.read_reg(3), 0, "an absent BAR reads zero");
}

#[test]
fn placement_programs_the_registers_with_the_type_bits() {
    let b = three();
    assert_eq!(b.read_reg(0), 0xc000_0000);
    assert_eq!(b.read_reg(1), 0xc001);
    assert_eq!((b.read_reg(2), b.read_reg(3)), (0xc, 2));
    assert_eq!(b.get(2).unwrap().addr, 0x2_0000_0000);
    let mut b = Bars::new();
    b.declare(0, BarKind::Mmio32, 0x1000, false).unwrap();
    b.declare(1, BarKind::Mmio32, 0x1000, false).unwrap();
    let e = b.place(&mut At(vec![0xc000_0000])).unwrap_err();
    assert_eq!((e.index, e.size), (1, 0x1000));
    assert!(
        e.to_string()
            .starts_with("cannot place BAR1 (0x1000 bytes): no room"),
        "{e}"
    );
}

#[test]
fn the_sizing_pattern_reads_back_the_size_mask_and_never_moves_the_bar() {
    let mut b = three();
    assert_eq!(w32(&mut b, 0, u32::MAX, MEM | IO), None);
    assert_eq!(b.read_reg(0), 0xfff0_0000, "1 MiB");
    assert_eq!(w32(&mut b, 1, u32::MAX, MEM | IO), None);
    assert_eq!(b.read_reg(1), 0xffff_ffe1, "32 bytes of I/O");
    assert_eq!(w32(&mut b, 2, u32::MAX, MEM | IO), None);
    assert_eq!(w32(&mut b, 3, u32::MAX, MEM | IO), None);
    assert_eq!((b.read_reg(2), b.read_reg(3)), (0xffff_c00c, u32::MAX));
    assert_eq!(w32(&mut b, 4, u32::MAX, MEM), None);
    assert_eq!(b.read_reg(4), 0, "no BAR4");
    assert_eq!(b.get(0).unwrap().addr, 0xc000_0000);
}

#[test]
fn a_bar_moves_only_while_its_decoding_is_on() {
    let mut b = three();
    assert_eq!(w32(&mut b, 0, 0xd000_0000, IO), None, "memory decode off");
    assert_eq!(b.get(0).unwrap().addr, 0xc000_0000);
    assert_eq!(
        b.sync_all(IO),
        vec![],
        "I/O decode says nothing of memory BARs"
    );
    assert_eq!(
        b.sync_all(MEM),
        vec![BarMove {
            index: 0,
            kind: BarKind::Mmio32,
            old: 0xc000_0000,
            new: 0xd000_0000,
            size: 0x10_0000
        }]
    );
    assert_eq!(b.sync_all(MEM), vec![], "applied once");
    let mv = w32(&mut b, 0, 0xd010_0000, MEM).expect("decoding on: moves at once");
    assert_eq!((mv.old, mv.new), (0xd000_0000, 0xd010_0000));
    // I/O follows the I/O bit, also for byte writes.
    assert_eq!(b.write_reg(1, 1, &[0xd0], MEM), None);
    let mv = b.sync_all(IO);
    assert_eq!((mv[0].index, mv[0].old, mv[0].new), (1, 0xc000, 0xd000));
}

#[test]
fn a_64_bit_bar_moves_with_both_halves_once_decoding_is_on() {
    let mut b = three();
    assert_eq!(w32(&mut b, 2, 0x8000, 0), None);
    assert_eq!(w32(&mut b, 3, 3, 0), None);
    assert_eq!((b.read_reg(2), b.read_reg(3)), (0x800c, 3));
    let mv = b.sync_all(MEM);
    assert_eq!((mv[0].index, mv[0].new), (2, 0x3_0000_8000));
    assert_eq!(mv[0].kind, BarKind::Mmio64);
    // With decoding on, the upper half alone moves it too.
    let mv = w32(&mut b, 3, 4, MEM).unwrap();
    assert_eq!((mv.old, mv.new), (0x3_0000_8000, 0x4_0000_8000));
}

#[test]
fn a_move_over_guest_ram_another_bar_or_past_the_address_space_is_contained() {
    let mut b = three();
    let cmd = MEM | IO;
    assert_eq!(
        w32(&mut b, 0, 0x1000_0000, cmd),
        None,
        "over RAM below 4 GiB"
    );
    assert_eq!(b.get(0).unwrap().addr, 0xc000_0000, "keeps decoding");
    assert_eq!(
        b.read_reg(0),
        0x1000_0000,
        "the register keeps the guest's value"
    );
    let mv = w32(&mut b, 0, 0xd000_0000, cmd).expect("a good write moves it");
    assert_eq!(
        (mv.old, mv.new),
        (0xc000_0000, 0xd000_0000),
        "from its last good place"
    );
    assert_eq!(w32(&mut b, 0, 0, cmd), None, "address 0");
    w32(&mut b, 2, 0, cmd);
    assert_eq!(w32(&mut b, 3, 1, cmd), None, "over RAM above 4 GiB");
    assert_eq!(b.get(2).unwrap().addr, 0x2_0000_0000);
    w32(&mut b, 2, 0xd000_0000, 0);
    assert_eq!(w32(&mut b, 3, 0, cmd), None, "over BAR0");
    assert_eq!(b.get(2).unwrap().addr, 0x2_0000_0000);
    w32(&mut b, 2, 0xffff_c000, cmd);
    assert_eq!(
        w32(&mut b, 3, u32::MAX, cmd),
        None,
        "wraps the address space"
    );
    assert_eq!(w32(&mut b, 1, 0xffe0, cmd).map(|m| m.new), Some(0xffe0));
    assert_eq!(w32(&mut b, 1, 0x1_0000, cmd), None, "I/O past port 0xffff");
}

#[test]
fn io_and_memory_bars_live_in_different_spaces() {
    /// A platform whose RAM is elsewhere: memory BARs may sit at low addresses.
    struct NoRam;
    impl BarAllocator for NoRam {
        fn allocate(&mut self, kind: BarKind, _: u64) -> Result<u64, AllocError> {
            Ok(if kind.is_io() { 0x2000 } else { 0x1000 })
        }
        fn guest_ram(&self) -> Vec<(u64, u64)> {
            Vec::new()
        }
    }
    let mut b = Bars::new();
    b.declare(0, BarKind::Mmio32, 0x1000, false).unwrap();
    b.declare(1, BarKind::Io, 0x100, false).unwrap();
    b.place(&mut NoRam).unwrap();
    let mv = w32(&mut b, 1, 0x1000, IO).expect("port 0x1000 is not memory 0x1000");
    assert_eq!((mv.old, mv.new), (0x2000, 0x1000));
}

#[test]
fn refusals_say_why() {
    let b = three();
    let bar0 = *b.get(0).unwrap();
    assert_eq!(
        b.check_place(&bar0, 0x7ff0_0000).unwrap_err().to_string(),
        "0x7ff00000..0x80000000 overlaps guest RAM 0x0..0x80000000"
    );
    let bar2 = *b.get(2).unwrap();
    assert_eq!(
        b.check_place(&bar2, 0xc000_0000).unwrap_err().to_string(),
        "0xc0000000..0xc0004000 overlaps BAR0 at 0xc0000000"
    );
}

#[test]
fn revert_puts_the_bar_and_its_register_back() {
    let mut b = three();
    let mv = w32(&mut b, 2, 0x8000, MEM).unwrap();
    b.revert(mv.index, mv.old);
    assert_eq!(b.get(2).unwrap().addr, 0x2_0000_0000);
    assert_eq!((b.read_reg(2), b.read_reg(3)), (0xc, 2));
    b.revert(4, 0x1234);
    assert_eq!(b.get(4), None, "reverting nothing does nothing");
}

#[test]
fn kinds_decode_from_their_command_bit() {
    assert!(BarKind::Io.decodes(IO) && !BarKind::Io.decodes(MEM));
    assert!(BarKind::Mmio32.decodes(MEM) && BarKind::Mmio64.decodes(MEM));
    assert!(!BarKind::Mmio64.decodes(IO));
}
