//! The ACPI fixed-hardware power management block of a PC chipset (ACPI 6.4, 4.8.3), at the I/O
//! base QEMU's PIIX4 and ICH9 give it (0x600): the PM1a event registers (status, enable), the
//! PM1a control register and the 24-bit PM timer, named by the FADT's PM1a_EVT_BLK,
//! PM1a_CNT_BLK and PM_TMR_BLK.
//!
//! Our FADT is hardware-reduced, so an ACPI OS sleeps and resets through [`super::acpi_pm`]
//! and ignores these (Linux still reads the PM timer's port). Programs that drive the PC
//! registers directly use them: kvm-unit-tests times `inl` from the PM timer, and its `s3` test
//! enables the RTC wake event here and enters S3 by writing SLP_TYP 1 with SLP_EN, as on QEMU.
//! No SCI is raised: status bits are for polling.

use std::time::{Duration, Instant};

use vm_device::{debug_limited, warn_limited};

use crate::devices::bus::BusDevice;
use crate::exit::{ExitHandle, VmExit};
use crate::sleep::SleepHandle;

/// The block's I/O base.
pub const PM_BLOCK_PORT: u64 = 0x600;
/// PM1a event block (status then enable), its offset in the block and length (PM1_EVT_LEN).
pub const PM1_EVT_OFFSET: u64 = 0;
/// PM1_EVT_LEN.
pub const PM1_EVT_LEN: u8 = 4;
/// PM1a control block offset.
pub const PM1_CNT_OFFSET: u64 = 4;
/// PM1_CNT_LEN.
pub const PM1_CNT_LEN: u8 = 2;
/// PM timer offset.
pub const PM_TMR_OFFSET: u64 = 8;
/// PM_TMR_LEN.
pub const PM_TMR_LEN: u8 = 4;
/// The block's length on the bus.
pub const PM_BLOCK_LEN: u64 = 12;
/// The PM timer runs at 3.579545 MHz (ACPI 6.4, 4.8.3.3).
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// SLP_TYP values QEMU's DSDT gives (`\_S3` 1, `\_S4` 2, and 0 for soft off), which programs
/// written for QEMU use directly.
pub const SLP_TYP_S5: u16 = 0;
/// Suspend to RAM.
pub const SLP_TYP_S3: u16 = 1;
/// Suspend to disk: a power-off, as QEMU treats it.
pub const SLP_TYP_S4: u16 = 2;

// PM1 status bits (ACPI 6.4, Table 4.16), write 1 to clear.
const TMR_STS: u16 = 1 << 0;
/// The RTC alarm fired (and woke the machine when RTC_EN was set).
pub const RTC_STS: u16 = 1 << 10;
/// The machine woke from a sleep state.
pub const WAK_STS: u16 = 1 << 15;
// PM1 enable bits (ACPI 6.4, Table 4.17): timer, global lock, power button, RTC.
const TMR_EN: u16 = 1 << 0;
const GBL_EN: u16 = 1 << 5;
const PWRBTN_EN: u16 = 1 << 8;
/// The RTC alarm may wake the machine.
pub const RTC_EN: u16 = 1 << 10;
const EN_BITS: u16 = TMR_EN | GBL_EN | PWRBTN_EN | RTC_EN;
// PM1 control (ACPI 6.4, Table 4.18): SCI_EN reads 1 (no SMI_CMD: always in ACPI mode),
// SLP_TYP bits 12:10, SLP_EN bit 13 (write-only).
const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;
const CNT_STORED: u16 = 0x3 << 1 | SLP_TYP_MASK; // BM_RLD, GBL_RLS, SLP_TYP
/// TMR_STS is set each time the counter's bit 23 changes.
const TMR_MSB_SHIFT: u32 = 23;
const TMR_MASK: u64 = (1 << 24) - 1;

/// The register block.
pub struct Pm1Block {
    status: u16,
    enable: u16,
    control: u16,
    /// Monotonic time since the timer started.
    elapsed: Box<dyn Fn() -> Duration + Send>,
    /// Timer bit-23 periods when TMR_STS was last cleared.
    tmr_sts_cleared_at: u64,
    exit: ExitHandle,
    sleep: Option<SleepHandle>,
}

impl Pm1Block {
    /// A block whose timer starts now, powering off through `exit` and suspending through
    /// `sleep` (without one, S3 requests are ignored: the machine has no S3).
    pub fn new(exit: ExitHandle, sleep: Option<SleepHandle>) -> Self {
        let start = Instant::now();
        Self::with_clock(exit, sleep, Box::new(move || start.elapsed()))
    }

    /// A block whose timer reads `elapsed`.
    pub fn with_clock(
        exit: ExitHandle,
        sleep: Option<SleepHandle>,
        elapsed: Box<dyn Fn() -> Duration + Send>,
    ) -> Self {
        Self {
            status: 0,
            enable: 0,
            control: SCI_EN,
            elapsed,
            tmr_sts_cleared_at: 0,
            exit,
            sleep,
        }
    }

    fn ticks(&self) -> u64 {
        let ns = (self.elapsed)().as_nanos();
        (ns * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u64
    }

    /// The PM timer's value (24 bits).
    pub fn timer(&self) -> u32 {
        (self.ticks() & TMR_MASK) as u32
    }

    fn status(&self) -> u16 {
        let flipped = self.ticks() >> TMR_MSB_SHIFT != self.tmr_sts_cleared_at;
        self.status | if flipped { TMR_STS } else { 0 }
    }

    /// Whether the RTC alarm is enabled as a wake event (PM1_EN.RTC_EN).
    pub fn rtc_wake_enabled(&self) -> bool {
        self.enable & RTC_EN != 0
    }

    /// Records a wake from S3: WAK_STS, and RTC_STS when the RTC alarm was the cause.
    pub fn note_wake(&mut self, by_rtc: bool) {
        self.status |= WAK_STS | if by_rtc { RTC_STS } else { 0 };
    }

    /// The block's bytes as the guest reads them.
    fn image(&self) -> [u8; PM_BLOCK_LEN as usize] {
        let mut b = [0u8; PM_BLOCK_LEN as usize];
        b[0..2].copy_from_slice(&self.status().to_le_bytes());
        b[2..4].copy_from_slice(&self.enable.to_le_bytes());
        b[4..6].copy_from_slice(&self.control.to_le_bytes());
        b[8..12].copy_from_slice(&self.timer().to_le_bytes());
        b
    }

    fn write_control(&mut self, value: u16, mask: u16) {
        self.control = (self.control & !mask | value & mask) & CNT_STORED | SCI_EN;
        if value & mask & SLP_EN == 0 {
            return;
        }
        let slp_typ = (self.control & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        match (slp_typ, &self.sleep) {
            (SLP_TYP_S5 | SLP_TYP_S4, _) => self.exit.request(VmExit::PowerOff),
            (SLP_TYP_S3, Some(sleep)) => {
                self.status &= !WAK_STS;
                sleep.suspend();
            }
            (SLP_TYP_S3, None) => warn_limited!("PM1 control: S3 requested, but this VM has no S3"),
            (other, _) => {
                debug_limited!("PM1 control: SLP_EN with unknown SLP_TYP {other} ignored")
            }
        }
    }
}

impl BusDevice for Pm1Block {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let image = self.image();
        for (i, b) in data.iter_mut().enumerate() {
            *b = image.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        // Gather the written bytes per 16-bit register, then apply each once.
        let mut regs = [(0u16, 0u16); 3];
        for (i, &b) in data.iter().enumerate() {
            let at = offset as usize + i;
            if let Some(r) = regs.get_mut(at / 2) {
                let shift = 8 * (at % 2);
                r.0 |= u16::from(b) << shift;
                r.1 |= 0xff << shift;
            }
        }
        let [(sts, sts_mask), (en, en_mask), (cnt, cnt_mask)] = regs;
        if sts_mask != 0 {
            let clear = sts & sts_mask;
            self.status &= !clear;
            if clear & TMR_STS != 0 {
                self.tmr_sts_cleared_at = self.ticks() >> TMR_MSB_SHIFT;
            }
        }
        if en_mask != 0 {
            self.enable = (self.enable & !en_mask | en & en_mask) & EN_BITS;
        }
        if cnt_mask != 0 {
            self.write_control(cnt, cnt_mask);
        }
        // The timer is read-only.
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    fn block(sleep: Option<SleepHandle>) -> (Pm1Block, ExitHandle, Arc<AtomicU64>) {
        let exit = ExitHandle::new().unwrap();
        let ns = Arc::new(AtomicU64::new(0));
        let clock = ns.clone();
        let b = Pm1Block::with_clock(
            exit.clone(),
            sleep,
            Box::new(move || Duration::from_nanos(clock.load(Ordering::Relaxed))),
        );
        (b, exit, ns)
    }

    fn read16(b: &mut Pm1Block, offset: u64) -> u16 {
        let mut d = [0u8; 2];
        b.read(PM_BLOCK_PORT, offset, &mut d);
        u16::from_le_bytes(d)
    }

    fn read32(b: &mut Pm1Block, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        b.read(PM_BLOCK_PORT, offset, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn timer_counts_at_3_579545_mhz_in_24_bits_and_flags_msb_changes() {
        let (mut b, _, ns) = block(None);
        assert_eq!(read32(&mut b, PM_TMR_OFFSET), 0);
        ns.store(1_000_000_000, Ordering::Relaxed);
        assert_eq!(read32(&mut b, PM_TMR_OFFSET), 3_579_545);
        assert_eq!(read16(&mut b, 0) & TMR_STS, 0);
        // 2^23 ticks (2.34 s): bit 23 changed.
        ns.store(2_400_000_000, Ordering::Relaxed);
        assert_ne!(read16(&mut b, 0) & TMR_STS, 0);
        b.write(PM_BLOCK_PORT, 0, &TMR_STS.to_le_bytes());
        assert_eq!(read16(&mut b, 0) & TMR_STS, 0);
        // Wraps at 2^24 ticks (4.69 s).
        ns.store(5_000_000_000, Ordering::Relaxed);
        let t = read32(&mut b, PM_TMR_OFFSET);
        assert_eq!(u64::from(t), (5 * PM_TIMER_HZ) & TMR_MASK);
        b.write(PM_BLOCK_PORT, PM_TMR_OFFSET, &[0; 4]);
        assert_eq!(read32(&mut b, PM_TMR_OFFSET), t, "the timer is read-only");
        let mut past = [0xffu8; 2];
        b.read(PM_BLOCK_PORT, PM_BLOCK_LEN - 1, &mut past);
        assert_eq!(past[1], 0);
    }

    #[test]
    fn enable_bits_stick_and_status_clears_by_writing_ones() {
        let (mut b, _, _) = block(None);
        // s3: `outw(0x400, pm1a_evt_blk + 2)`.
        b.write(PM_BLOCK_PORT, 2, &RTC_EN.to_le_bytes());
        assert!(b.rtc_wake_enabled());
        b.write(PM_BLOCK_PORT, 2, &0xffffu16.to_le_bytes());
        assert_eq!(read16(&mut b, 2), EN_BITS);
        b.note_wake(true);
        assert_eq!(read16(&mut b, 0), WAK_STS | RTC_STS);
        // A 32-bit write to the event block clears status and sets enables at once.
        let v = u32::from(RTC_STS) | u32::from(RTC_EN) << 16;
        b.write(PM_BLOCK_PORT, 0, &v.to_le_bytes());
        assert_eq!(
            read32(&mut b, 0),
            u32::from(WAK_STS) | u32::from(RTC_EN) << 16
        );
        // Control: SCI_EN always on, SLP_TYP kept, SLP_EN not.
        assert_eq!(read16(&mut b, PM1_CNT_OFFSET), SCI_EN);
        b.write(
            PM_BLOCK_PORT,
            PM1_CNT_OFFSET,
            &(5u16 << SLP_TYP_SHIFT).to_le_bytes(),
        );
        assert_eq!(read16(&mut b, PM1_CNT_OFFSET), SCI_EN | 5 << SLP_TYP_SHIFT);
    }

    #[test]
    fn slp_en_powers_off_for_s5_and_s4_and_suspends_for_s3() {
        for typ in [SLP_TYP_S5, SLP_TYP_S4] {
            let (mut b, exit, _) = block(None);
            let v = SLP_EN | typ << SLP_TYP_SHIFT;
            b.write(PM_BLOCK_PORT, PM1_CNT_OFFSET, &v.to_le_bytes());
            assert_eq!(exit.reason(), Some(VmExit::PowerOff));
        }
        // S3 without sleep support: nothing happens.
        let (mut b, exit, _) = block(None);
        b.write(PM_BLOCK_PORT, PM1_CNT_OFFSET, &0x2400u16.to_le_bytes());
        assert_eq!(exit.reason(), None);
        // With it: s3's `outw(0x2400, pm1a_cnt_blk)` suspends; WAK_STS clears for the wake.
        let sleep = SleepHandle::new().unwrap();
        let (mut b, exit, _) = block(Some(sleep.clone()));
        b.note_wake(false);
        b.write(PM_BLOCK_PORT, PM1_CNT_OFFSET, &0x2400u16.to_le_bytes());
        assert!(sleep.is_asleep());
        assert_eq!(exit.reason(), None);
        assert_eq!(read16(&mut b, 0) & WAK_STS, 0);
        // An unknown type is ignored.
        let (mut b, exit, _) = block(None);
        b.write(
            PM_BLOCK_PORT,
            PM1_CNT_OFFSET,
            &(SLP_EN | 6 << SLP_TYP_SHIFT).to_le_bytes(),
        );
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn sleep_requests_a_guest_repeats_cannot_flood_the_log() {
        use vm_device::ratelimit::{capture::lines_logged_by, BURST};

        let (mut b, exit, _) = block(None);
        let lines = lines_logged_by(|| {
            for _ in 0..10_000 {
                for slp_typ in [SLP_TYP_S3, 5] {
                    let v = slp_typ << SLP_TYP_SHIFT | SLP_EN;
                    b.write(PM_BLOCK_PORT, PM1_CNT_OFFSET, &v.to_le_bytes());
                }
            }
        });
        assert!(
            lines.len() <= 2 * BURST as usize,
            "{} lines for 20000 refused sleeps",
            lines.len()
        );
        assert_eq!(exit.reason(), None, "neither sleeps nor powers off");
    }
}
