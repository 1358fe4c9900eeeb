//! The PC real-time clock and CMOS RAM: a Motorola MC146818A at ports 0x70 (index; bit 7 is
//! the NMI mask, ignored) and 0x71 (data), keeping the host's UTC time plus whatever offset the
//! guest sets.
//!
//! Flags in register C are worked out when the guest reads it (an update or alarm moment passed
//! since the last read); the RTC raises no IRQ 8. Its alarm is what wakes a VM from S3:
//! [`Rtc::next_alarm`] says when. kvm-unit-tests' `s3` waits for the update-in-progress bit to
//! rise and fall, then sets a once-a-second alarm and sleeps.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::devices::bus::BusDevice;

/// The index port; the data port is the next one.
pub const RTC_PORT: u64 = 0x70;
/// Index and data ports.
pub const RTC_LEN: u64 = 2;

// Register indexes (MC146818A datasheet, "Address Map").
const REG_SECONDS: u8 = 0x00;
const REG_SECONDS_ALARM: u8 = 0x01;
const REG_MINUTES: u8 = 0x02;
const REG_MINUTES_ALARM: u8 = 0x03;
const REG_HOURS: u8 = 0x04;
const REG_HOURS_ALARM: u8 = 0x05;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY_OF_MONTH: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// The century byte of the IBM PC's CMOS layout (named by the FADT's CENTURY field).
const REG_CENTURY: u8 = 0x32;
const CMOS_LEN: usize = 128;
/// Bit 7 of the index port masks NMIs; the register index is the low 7 bits.
const INDEX_MASK: u8 = 0x7f;

// Register A: update in progress, divider (010: 32.768 kHz time base, running), rate select.
const REG_A_UIP: u8 = 0x80;
const REG_A_DV_MASK: u8 = 0x70;
const REG_A_DV_RUNNING: u8 = 0x20;
const REG_A_RS_MASK: u8 = 0x0f;
// Register B: SET halts updates; interrupt enables; binary (not BCD); 24-hour mode.
const REG_B_SET: u8 = 0x80;
const REG_B_PIE: u8 = 0x40;
const REG_B_AIE: u8 = 0x20;
const REG_B_UIE: u8 = 0x10;
const REG_B_DM_BINARY: u8 = 0x04;
const REG_B_24H: u8 = 0x02;
// Register C: interrupt request and the periodic, alarm and update-ended flags.
const REG_C_IRQF: u8 = 0x80;
const REG_C_PF: u8 = 0x40;
const REG_C_AF: u8 = 0x20;
const REG_C_UF: u8 = 0x10;
// Register D: valid RAM and time.
const REG_D_VRT: u8 = 0x80;
/// An alarm byte with bits 7:6 set matches any value ("don't care").
const ALARM_DONT_CARE: u8 = 0xc0;
/// UIP rises this long before each update (datasheet, t_BUC = 244 us).
const UIP_LEAD: Duration = Duration::from_micros(244);
/// The 12-hour mode's PM bit in the hours bytes.
const HOUR_PM: u8 = 0x80;
const SECS_PER_DAY: i64 = 86_400;
/// Power-on values: 32.768 kHz base with 1024 Hz periodic rate; 24-hour BCD.
const REG_A_INIT: u8 = REG_A_DV_RUNNING | 0x06;
const REG_B_INIT: u8 = REG_B_24H;

/// The host's wall clock, as a duration since the Unix epoch.
pub trait WallClock: Send {
    /// Now.
    fn now(&self) -> Duration;
}

/// [`SystemTime`].
pub struct SystemWallClock;

impl WallClock for SystemWallClock {
    fn now(&self) -> Duration {
        // A host clock before 1970 reads as the epoch.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// A broken-down UTC date and time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 (Sunday) to 7.
    weekday: u8,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant, "chrono-Compatible
/// Low-Level Date Algorithms", days_from_civil).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`] (civil_from_days), with the time of day.
fn to_datetime(secs: i64) -> DateTime {
    let days = secs.div_euclid(SECS_PER_DAY);
    let tod = secs.rem_euclid(SECS_PER_DAY);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    DateTime {
        year,
        month,
        day,
        hour: (tod / 3600) as u8,
        minute: (tod / 60 % 60) as u8,
        second: (tod % 60) as u8,
        // 1970-01-01 was a Thursday (5 when Sunday is 1).
        weekday: ((days + 4).rem_euclid(7) + 1) as u8,
    }
}

fn from_datetime(t: &DateTime) -> i64 {
    days_from_civil(t.year, t.month, t.day) * SECS_PER_DAY
        + i64::from(t.hour) * 3600
        + i64::from(t.minute) * 60
        + i64::from(t.second)
}

/// The periodic interrupt's period for register A's rate select (datasheet, "Periodic
/// Interrupt Rate"): 32768 Hz >> (RS - 1) for RS 3..=15; RS 1 and 2 repeat RS 8 and 9; 0 is off.
fn periodic_period(reg_a: u8) -> Option<Duration> {
    let rs = match reg_a & REG_A_RS_MASK {
        0 => return None,
        rs @ 1..=2 => rs + 7,
        rs => rs,
    };
    Some(Duration::from_nanos(
        (1_000_000_000u64 << (rs - 1)) / 32_768,
    ))
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// Guest-written BCD is not checked by the chip; digits above 9 count as their value.
fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0xf)
}

/// The device.
pub struct Rtc {
    clock: Box<dyn WallClock>,
    index: u8,
    /// CMOS RAM; the time bytes are computed, the rest stored here.
    cmos: [u8; CMOS_LEN],
    /// Guest time minus host time, in seconds.
    offset: i64,
    /// While register B's SET bit is on: the time, stopped (the guest is setting it).
    frozen: Option<i64>,
    /// Host time of the last register C read: flags cover the time since.
    flags_since: Duration,
}

impl Rtc {
    /// An RTC on the host's wall clock.
    pub fn new() -> Self {
        Self::with_clock(Box::new(SystemWallClock))
    }

    /// An RTC reading `clock`.
    pub fn with_clock(clock: Box<dyn WallClock>) -> Self {
        let mut cmos = [0u8; CMOS_LEN];
        cmos[REG_A as usize] = REG_A_INIT;
        cmos[REG_B as usize] = REG_B_INIT;
        cmos[REG_D as usize] = REG_D_VRT;
        let flags_since = clock.now();
        Self {
            clock,
            index: 0,
            cmos,
            offset: 0,
            frozen: None,
            flags_since,
        }
    }

    fn reg(&self, r: u8) -> u8 {
        self.cmos[r as usize]
    }

    /// Whether the time advances: the divider runs and SET is off.
    fn running(&self) -> bool {
        self.reg(REG_A) & REG_A_DV_MASK == REG_A_DV_RUNNING && self.reg(REG_B) & REG_B_SET == 0
    }

    /// Guest time in whole seconds, and how far into that second the host is.
    fn guest_time(&self, host: Duration) -> (i64, Duration) {
        match self.frozen {
            Some(t) => (t, Duration::ZERO),
            None => (
                host.as_secs() as i64 + self.offset,
                Duration::from_nanos(host.subsec_nanos().into()),
            ),
        }
    }

    fn encode(&self, v: u8) -> u8 {
        if self.reg(REG_B) & REG_B_DM_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.reg(REG_B) & REG_B_DM_BINARY != 0 {
            v
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, h: u8) -> u8 {
        if self.reg(REG_B) & REG_B_24H != 0 {
            return self.encode(h);
        }
        let pm = if h >= 12 { HOUR_PM } else { 0 };
        let h12 = match h % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.reg(REG_B) & REG_B_24H != 0 {
            return self.decode(v);
        }
        let h12 = self.decode(v & !HOUR_PM) % 12;
        if v & HOUR_PM != 0 {
            h12 + 12
        } else {
            h12
        }
    }

    /// Whether guest time `t` matches the alarm bytes. The chip compares bytes as the time
    /// registers hold them (BCD or binary, 12- or 24-hour), so a byte no time takes never
    /// matches.
    fn alarm_matches(&self, t: i64) -> bool {
        let dt = to_datetime(t);
        let matches = |reg: u8, current: u8| {
            let a = self.reg(reg);
            a & ALARM_DONT_CARE == ALARM_DONT_CARE || a == current
        };
        matches(REG_SECONDS_ALARM, self.encode(dt.second))
            && matches(REG_MINUTES_ALARM, self.encode(dt.minute))
            && matches(REG_HOURS_ALARM, self.encode_hour(dt.hour))
    }

    /// Host time of the next alarm while the alarm interrupt is enabled and the clock runs:
    /// what wakes a suspended VM. An alarm matches at least once a day, or never.
    pub fn next_alarm(&self) -> Option<Duration> {
        if self.reg(REG_B) & REG_B_AIE == 0 || !self.running() {
            return None;
        }
        let now = self.clock.now();
        let (t, _) = self.guest_time(now);
        (1..=SECS_PER_DAY)
            .find(|d| self.alarm_matches(t + d))
            .map(|d| Duration::from_secs(now.as_secs() + d as u64))
    }

    /// Register C: the flags for what happened since the last read (which clears them).
    fn read_flags(&mut self) -> u8 {
        let now = self.clock.now();
        let since = std::mem::replace(&mut self.flags_since, now);
        if !self.running() || now <= since {
            return 0;
        }
        let (first, last) = (
            since.as_secs() as i64 + self.offset + 1,
            now.as_secs() as i64 + self.offset,
        );
        let mut flags = 0;
        if last >= first {
            flags |= REG_C_UF;
            // A day covers every alarm that can match.
            if (first..=last.min(first + SECS_PER_DAY)).any(|t| self.alarm_matches(t)) {
                flags |= REG_C_AF;
            }
        }
        if periodic_period(self.reg(REG_A)).is_some_and(|p| now - since >= p) {
            flags |= REG_C_PF;
        }
        let b = self.reg(REG_B);
        let enabled = (b & REG_B_PIE != 0 && flags & REG_C_PF != 0)
            || (b & REG_B_AIE != 0 && flags & REG_C_AF != 0)
            || (b & REG_B_UIE != 0 && flags & REG_C_UF != 0);
        if enabled {
            flags |= REG_C_IRQF;
        }
        flags
    }

    fn read_register(&mut self, r: u8) -> u8 {
        let now = self.clock.now();
        let (t, frac) = self.guest_time(now);
        let dt = to_datetime(t);
        match r {
            REG_SECONDS => self.encode(dt.second),
            REG_MINUTES => self.encode(dt.minute),
            REG_HOURS => self.encode_hour(dt.hour),
            REG_DAY_OF_WEEK => self.encode(dt.weekday),
            REG_DAY_OF_MONTH => self.encode(dt.day),
            REG_MONTH => self.encode(dt.month),
            REG_YEAR => self.encode(dt.year.rem_euclid(100) as u8),
            REG_CENTURY => self.encode(dt.year.div_euclid(100).clamp(0, 99) as u8),
            REG_A => {
                let uip = self.running() && frac >= Duration::from_secs(1) - UIP_LEAD;
                self.reg(REG_A) | if uip { REG_A_UIP } else { 0 }
            }
            REG_C => self.read_flags(),
            _ => self.reg(r),
        }
    }

    /// Rewrites one time field: the clock keeps running from the new time (or stays stopped
    /// there while SET is on).
    fn set_time_field(&mut self, r: u8, v: u8) {
        let now = self.clock.now();
        let (t, _) = self.guest_time(now);
        let mut dt = to_datetime(t);
        let value = if r == REG_HOURS {
            self.decode_hour(v)
        } else {
            self.decode(v)
        };
        match r {
            REG_SECONDS => dt.second = value.min(59),
            REG_MINUTES => dt.minute = value.min(59),
            REG_HOURS => dt.hour = value.min(23),
            REG_DAY_OF_MONTH => dt.day = value.clamp(1, 31),
            REG_MONTH => dt.month = value.clamp(1, 12),
            REG_YEAR => dt.year = dt.year.div_euclid(100) * 100 + i64::from(value.min(99)),
            REG_CENTURY => dt.year = i64::from(value.min(99)) * 100 + dt.year.rem_euclid(100),
            // The day of the week follows from the date.
            _ => return,
        }
        let t = from_datetime(&dt);
        match self.frozen {
            Some(_) => self.frozen = Some(t),
            None => self.offset = t - now.as_secs() as i64,
        }
    }

    fn write_register(&mut self, r: u8, v: u8) {
        match r {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY_OF_WEEK | REG_DAY_OF_MONTH
            | REG_MONTH | REG_YEAR | REG_CENTURY => self.set_time_field(r, v),
            // UIP is read-only.
            REG_A => self.cmos[REG_A as usize] = v & !REG_A_UIP,
            REG_B => {
                let now = self.clock.now();
                match (self.frozen, v & REG_B_SET != 0) {
                    (None, true) => self.frozen = Some(self.guest_time(now).0),
                    (Some(t), false) => {
                        self.frozen = None;
                        self.offset = t - now.as_secs() as i64;
                    }
                    _ => {}
                }
                self.cmos[REG_B as usize] = v;
            }
            REG_C | REG_D => {}
            _ => self.cmos[r as usize] = v,
        }
    }
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = match offset {
            // The index port reads back nothing useful on a PC.
            0 => 0xff,
            _ => self.read_register(self.index),
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        match offset {
            0 => self.index = v & INDEX_MASK,
            _ => self.write_register(self.index, v),
        }
    }
}

#[cfg(test)]
#[path = "rtc_tests.rs"]
mod tests;
