//! What a PC BIOS's POST leaves behind that a kernel started by a boot loader (a multiboot
//! kernel) may count on, as SeaBIOS leaves it under QEMU: a real-mode interrupt vector table
//! whose hardware-interrupt vectors acknowledge the 8259 PICs, the PICs initialised at vectors
//! 0x08 and 0x70 with only the timer and the cascade unmasked, and PIT channel 0 ticking at
//! 18.2 Hz (mode 3, count 65536). kvm-unit-tests' `realmode` test halts with interrupts on
//! and relies on the timer tick to wake up.
//!
//! There is no BIOS behind the vectors: software interrupts return at once.

use kvm_bindings::{
    kvm_irqchip, kvm_pic_state, kvm_pit_state2, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The interrupt handlers' home: F000:FF80, in the BIOS area below the reset vector (outside
/// the e820 RAM map, so the guest leaves it alone).
pub const BIOS_STUBS_START: u64 = 0xfff80;
const BIOS_SEGMENT: u32 = 0xf000;
/// The real-mode IVT: 256 far pointers at address 0.
const IVT_START: u64 = 0;
const IVT_ENTRIES: usize = 256;
/// PIC vector bases as a PC BIOS programs them (ICW2): IRQ 0-7 at 0x08, IRQ 8-15 at 0x70.
pub const MASTER_PIC_VECTOR: u8 = 0x08;
/// See [`MASTER_PIC_VECTOR`].
pub const SLAVE_PIC_VECTOR: u8 = 0x70;
/// IMRs: the master passes IRQ 0 (timer) and IRQ 2 (the slave's cascade).
const MASTER_IMR: u8 = !(1 << 0 | 1 << 2);
const SLAVE_IMR: u8 = 0xff;
/// PIT channel 0 (Intel 8254 datasheet): mode 3 (square wave), LSB then MSB, count 0 (65536),
/// that is 1193182 Hz / 65536 = 18.2 Hz.
const PIT_MODE_SQUARE_WAVE: u8 = 3;
const PIT_RW_LSB_MSB: u8 = 3;
const PIT_COUNT_65536: u32 = 0x1_0000;

/// `iret`.
const IRET_STUB: [u8; 1] = [0xcf];
/// `push ax; mov al, 0x20; out 0x20, al; pop ax; iret`: non-specific EOI to the master PIC.
const MASTER_EOI_STUB: [u8; 7] = [0x50, 0xb0, 0x20, 0xe6, 0x20, 0x58, 0xcf];
/// The same for an IRQ through the slave: EOI to the slave (port 0xa0), then the master.
const SLAVE_EOI_STUB: [u8; 9] = [0x50, 0xb0, 0x20, 0xe6, 0xa0, 0xe6, 0x20, 0x58, 0xcf];
const MASTER_EOI_OFFSET: u64 = IRET_STUB.len() as u64;
const SLAVE_EOI_OFFSET: u64 = MASTER_EOI_OFFSET + MASTER_EOI_STUB.len() as u64;

/// Errors setting up the BIOS state.
#[derive(Debug, thiserror::Error)]
pub enum BiosError {
    /// Guest memory write failed.
    #[error("cannot write the BIOS {what} at guest address {addr:#x}: {source}")]
    Write {
        what: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    /// A KVM irqchip or PIT ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn far_pointer(linear: u64) -> u32 {
    let offset = (linear - (u64::from(BIOS_SEGMENT) << 4)) as u32;
    (BIOS_SEGMENT << 16) | offset
}

/// The IVT: hardware-interrupt vectors to the EOI stubs, everything else to `iret`.
pub fn ivt() -> [u32; IVT_ENTRIES] {
    let mut ivt = [far_pointer(BIOS_STUBS_START); IVT_ENTRIES];
    for irq in 0..8 {
        ivt[usize::from(MASTER_PIC_VECTOR) + irq] =
            far_pointer(BIOS_STUBS_START + MASTER_EOI_OFFSET);
        ivt[usize::from(SLAVE_PIC_VECTOR) + irq] = far_pointer(BIOS_STUBS_START + SLAVE_EOI_OFFSET);
    }
    ivt
}

/// Writes the IVT and its handlers.
pub fn write_ivt(mem: &GuestMemoryMmap) -> Result<(), BiosError> {
    let write = |what, addr, bytes: &[u8]| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| BiosError::Write { what, addr, source })
    };
    let mut stubs = IRET_STUB.to_vec();
    stubs.extend_from_slice(&MASTER_EOI_STUB);
    stubs.extend_from_slice(&SLAVE_EOI_STUB);
    write("interrupt handlers", BIOS_STUBS_START, &stubs)?;
    let ivt: Vec<u8> = ivt().iter().flat_map(|e| e.to_le_bytes()).collect();
    write("interrupt vector table", IVT_START, &ivt)
}

/// A PIC as the BIOS leaves it: initialised (ICW4 expected, 8086 mode) at `vector` with `imr`.
fn pic(mut state: kvm_pic_state, vector: u8, imr: u8) -> kvm_pic_state {
    state.irq_base = vector;
    state.imr = imr;
    state.init4 = 1;
    state.init_state = 0;
    state
}

/// PIT channel 0 ticking at 18.2 Hz; the other channels as they were.
fn pit(mut state: kvm_pit_state2) -> kvm_pit_state2 {
    let ch = &mut state.channels[0];
    ch.mode = PIT_MODE_SQUARE_WAVE;
    ch.rw_mode = PIT_RW_LSB_MSB;
    ch.count = PIT_COUNT_65536;
    ch.gate = 1;
    state
}

/// Programs the in-kernel PICs and PIT (created by KVM_CREATE_IRQCHIP and KVM_CREATE_PIT2).
pub fn program_pic_and_pit(vm: &VmFd) -> Result<(), BiosError> {
    let kvm = |what| move |source| BiosError::Kvm { what, source };
    for (chip_id, vector, imr) in [
        (KVM_IRQCHIP_PIC_MASTER, MASTER_PIC_VECTOR, MASTER_IMR),
        (KVM_IRQCHIP_PIC_SLAVE, SLAVE_PIC_VECTOR, SLAVE_IMR),
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
        // SAFETY: for the PIC chip ids KVM fills (and reads) the `pic` member of the union.
        let state = unsafe { chip.chip.pic };
        chip.chip.pic = pic(state, vector, imr);
        vm.set_irqchip(&chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    let state = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
    vm.set_pit2(&pit(state)).map_err(kvm("KVM_SET_PIT2"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::boot::RESET_STUB;
    use crate::arch::x86_64::layout::RESET_VECTOR;

    #[test]
    fn ivt_sends_irqs_to_eoi_stubs_and_the_rest_to_iret() {
        let ivt = ivt();
        assert_eq!(ivt[0x08], 0xf000_ff81, "IRQ 0: master EOI");
        assert_eq!(ivt[0x0f], 0xf000_ff81);
        assert_eq!(ivt[0x73], 0xf000_ff88, "IRQ 11: slave then master EOI");
        assert_eq!(ivt[0x10], 0xf000_ff80, "int 0x10: iret");
        assert_eq!(ivt[0xff], 0xf000_ff80);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_ivt(&mem).unwrap();
        let e: u32 = mem.read_obj(GuestAddress(0x08 * 4)).unwrap();
        assert_eq!(e, 0xf000_ff81);
        let mut stub = [0u8; 7];
        mem.read_slice(&mut stub, GuestAddress(0xfff81)).unwrap();
        assert_eq!(stub, MASTER_EOI_STUB);
        // The stubs end before the reset vector's code.
        let end = BIOS_STUBS_START + SLAVE_EOI_OFFSET + SLAVE_EOI_STUB.len() as u64;
        assert!(end <= RESET_VECTOR && RESET_VECTOR + RESET_STUB.len() as u64 <= 1 << 20);
    }

    #[test]
    fn pics_and_pit_as_post_leaves_them() {
        let m = pic(kvm_pic_state::default(), MASTER_PIC_VECTOR, MASTER_IMR);
        assert_eq!((m.irq_base, m.imr, m.init4), (0x08, 0xfa, 1));
        let s = pic(kvm_pic_state::default(), SLAVE_PIC_VECTOR, SLAVE_IMR);
        assert_eq!((s.irq_base, s.imr), (0x70, 0xff));
        let mut base = kvm_pit_state2::default();
        base.channels[2].mode = 0xff;
        let p = pit(base);
        assert_eq!(
            (p.channels[0].mode, p.channels[0].count, p.channels[0].gate),
            (3, 0x1_0000, 1)
        );
        assert_eq!(p.channels[2].mode, 0xff, "channel 2 untouched");
    }
}
