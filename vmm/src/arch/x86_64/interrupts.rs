//! Local APIC set-up: LINT0 as ExtINT (the 8259 PIC's output) and LINT1 as NMI, as a PC BIOS
//! leaves them (Intel MultiProcessor Specification 1.4, 3.6.2.2 "virtual wire mode"); and, on a
//! machine with APIC IDs no xAPIC can have, x2APIC mode, as firmware leaves it there.

use kvm_bindings::kvm_lapic_state;

// Local vector table registers (Intel SDM Vol. 3A, Table 11-1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
// Delivery mode field, bits 10:8 (SDM Vol. 3A, 11.5.1).
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// The highest xAPIC ID a processor can have: 255 is the xAPIC broadcast ID (SDM Vol. 3A,
/// 10.6.2.1). A machine with more processors numbers the rest with x2APIC IDs.
pub const MAX_XAPIC_ID: u32 = 254;

/// IA32_APIC_BASE bit 10 (EXTD): x2APIC mode, with bit 11 (EN) (SDM Vol. 3A, 10.12.1).
const APIC_BASE_EXTD: u64 = 1 << 10;
const APIC_BASE_EN: u64 = 1 << 11;

/// IA32_APIC_BASE `base` in x2APIC mode. A machine with APIC IDs above [`MAX_XAPIC_ID`] starts
/// its processors so, as firmware does (SeaBIOS, OVMF): an OS learns those IDs from the MADT's
/// x2APIC entries, which Linux takes only when it finds x2APIC on at boot.
pub fn x2apic_mode(base: u64) -> u64 {
    base | APIC_BASE_EN | APIC_BASE_EXTD
}

fn get_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *byte as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Programs LINT0/LINT1 in `state` (from KVM_GET_LAPIC).
pub fn set_lint(state: &mut kvm_lapic_state) {
    let lvt0 = get_reg(state, APIC_LVT0);
    set_reg(state, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_reg(state, APIC_LVT1);
    set_reg(state, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x2apic_mode_sets_extd_with_en_and_keeps_the_rest() {
        assert_eq!(x2apic_mode(0xfee0_0900), 0xfee0_0d00, "BSP flag kept");
        assert_eq!(x2apic_mode(0xfee0_0000), 0xfee0_0c00);
    }

    #[test]
    fn lint_modes() {
        let mut s = kvm_lapic_state::default();
        set_reg(&mut s, APIC_LVT0, 0x0001_0000);
        set_lint(&mut s);
        assert_eq!(get_reg(&s, APIC_LVT0), 0x0001_0700);
        assert_eq!(get_reg(&s, APIC_LVT1), 0x400);
    }
}
