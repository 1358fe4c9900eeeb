use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::*;

/// 2024-03-15 13:45:30 UTC, a Friday.
const T0: u64 = 1_710_510_330;

#[derive(Clone)]
struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    fn at(secs: u64, nanos: u64) -> Self {
        Self(Arc::new(AtomicU64::new(secs * 1_000_000_000 + nanos)))
    }
    fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl WallClock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

fn rtc_at(secs: u64, nanos: u64) -> (Rtc, ManualClock) {
    let clock = ManualClock::at(secs, nanos);
    (Rtc::with_clock(Box::new(clock.clone())), clock)
}

fn read(rtc: &mut Rtc, reg: u8) -> u8 {
    rtc.write(RTC_PORT, 0, &[reg]);
    let mut b = [0u8];
    rtc.read(RTC_PORT, 1, &mut b);
    b[0]
}

fn write(rtc: &mut Rtc, reg: u8, v: u8) {
    rtc.write(RTC_PORT, 0, &[reg]);
    rtc.write(RTC_PORT, 1, &[v]);
}

#[test]
fn calendar_conversions_round_trip() {
    for (secs, want) in [
        (
            0,
            DateTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 5,
            },
        ),
        (
            951_782_400,
            DateTime {
                year: 2000,
                month: 2,
                day: 29,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 3,
            },
        ),
        (
            4_102_444_799,
            DateTime {
                year: 2099,
                month: 12,
                day: 31,
                hour: 23,
                minute: 59,
                second: 59,
                weekday: 5,
            },
        ),
    ] {
        assert_eq!(to_datetime(secs), want);
        assert_eq!(from_datetime(&want), secs);
    }
    for secs in (0..5_000_000_000i64).step_by(7_777_777) {
        assert_eq!(from_datetime(&to_datetime(secs)), secs);
    }
}

#[test]
fn time_reads_in_bcd_24_hour_mode_then_binary_12_hour_mode() {
    let (mut rtc, _) = rtc_at(T0, 0);
    assert_eq!(read(&mut rtc, REG_SECONDS), 0x30);
    assert_eq!(read(&mut rtc, REG_MINUTES), 0x45);
    assert_eq!(read(&mut rtc, REG_HOURS), 0x13);
    assert_eq!(read(&mut rtc, REG_DAY_OF_WEEK), 6);
    assert_eq!(read(&mut rtc, REG_DAY_OF_MONTH), 0x15);
    assert_eq!(read(&mut rtc, REG_MONTH), 0x03);
    assert_eq!(read(&mut rtc, REG_YEAR), 0x24);
    assert_eq!(read(&mut rtc, REG_CENTURY), 0x20);
    assert_eq!(read(&mut rtc, REG_D), REG_D_VRT);

    write(&mut rtc, REG_B, REG_B_DM_BINARY);
    assert_eq!(read(&mut rtc, REG_SECONDS), 30);
    assert_eq!(read(&mut rtc, REG_HOURS), HOUR_PM | 1, "1 PM");
    assert_eq!(read(&mut rtc, REG_YEAR), 24);
}

#[test]
fn update_in_progress_shows_in_the_last_244_us_of_a_second() {
    let (mut rtc, clock) = rtc_at(T0, 500_000_000);
    assert_eq!(read(&mut rtc, REG_A), REG_A_INIT);
    clock.advance(Duration::from_micros(499_800));
    assert_eq!(read(&mut rtc, REG_A), REG_A_INIT | REG_A_UIP);
    clock.advance(Duration::from_micros(300));
    assert_eq!(read(&mut rtc, REG_A), REG_A_INIT, "the update is over");
    assert_eq!(read(&mut rtc, REG_SECONDS), 0x31);
    // SET stops updates, and with them UIP.
    clock.advance(Duration::from_micros(999_800));
    write(&mut rtc, REG_B, REG_B_INIT | REG_B_SET);
    assert_eq!(read(&mut rtc, REG_A) & REG_A_UIP, 0);
    // UIP itself is read-only.
    write(&mut rtc, REG_A, 0xff);
    assert_eq!(rtc.reg(REG_A), 0x7f);
}

#[test]
fn setting_the_time_under_set_holds_it_then_runs_from_it() {
    let (mut rtc, clock) = rtc_at(T0, 0);
    write(&mut rtc, REG_B, REG_B_INIT | REG_B_SET);
    write(&mut rtc, REG_HOURS, 0x08);
    write(&mut rtc, REG_MINUTES, 0x00);
    write(&mut rtc, REG_SECONDS, 0x00);
    clock.advance(Duration::from_secs(5));
    assert_eq!(read(&mut rtc, REG_SECONDS), 0x00, "stopped while SET");
    write(&mut rtc, REG_B, REG_B_INIT);
    clock.advance(Duration::from_secs(61));
    assert_eq!(read(&mut rtc, REG_HOURS), 0x08);
    assert_eq!(read(&mut rtc, REG_MINUTES), 0x01);
    assert_eq!(read(&mut rtc, REG_SECONDS), 0x01);
    assert_eq!(read(&mut rtc, REG_DAY_OF_MONTH), 0x15, "the date stays");
    // Without SET, a write moves the running clock.
    write(&mut rtc, REG_YEAR, 0x30);
    assert_eq!(read(&mut rtc, REG_YEAR), 0x30);
    assert_eq!(read(&mut rtc, REG_CENTURY), 0x20);
}

#[test]
fn register_c_reports_updates_and_alarms_since_its_last_read() {
    let (mut rtc, clock) = rtc_at(T0, 100);
    // No periodic rate for now.
    write(&mut rtc, REG_A, REG_A_DV_RUNNING);
    assert_eq!(read(&mut rtc, REG_C), 0);
    clock.advance(Duration::from_secs(1));
    // An update happened; the alarm bytes (0) match 00:00:00 only.
    assert_eq!(read(&mut rtc, REG_C), REG_C_UF);
    assert_eq!(read(&mut rtc, REG_C), 0, "reading clears");
    // s3's settings: every byte "don't care", alarm interrupt on.
    for r in [REG_SECONDS_ALARM, REG_MINUTES_ALARM, REG_HOURS_ALARM] {
        write(&mut rtc, r, ALARM_DONT_CARE);
    }
    let b = read(&mut rtc, REG_B);
    write(&mut rtc, REG_B, b | REG_B_AIE);
    clock.advance(Duration::from_secs(1));
    assert_eq!(read(&mut rtc, REG_C), REG_C_IRQF | REG_C_AF | REG_C_UF);
    // The periodic flag needs its rate's period to pass (1024 Hz: under a ms).
    write(&mut rtc, REG_A, REG_A_INIT);
    assert_eq!(read(&mut rtc, REG_C), 0);
    clock.advance(Duration::from_micros(500));
    assert_eq!(read(&mut rtc, REG_C), 0);
    clock.advance(Duration::from_millis(2));
    assert_eq!(read(&mut rtc, REG_C), REG_C_PF);
    assert_eq!(periodic_period(0x0f), Some(Duration::from_millis(500)));
    assert_eq!(periodic_period(0x01), periodic_period(0x08));
    assert_eq!(periodic_period(0x20), None);
}

#[test]
fn next_alarm_needs_the_alarm_interrupt_and_finds_the_matching_second() {
    let (mut rtc, _) = rtc_at(T0, 5);
    assert_eq!(rtc.next_alarm(), None, "AIE off");
    write(&mut rtc, REG_B, REG_B_INIT | REG_B_AIE);
    // Alarm at hh:mm:40 of any hour and minute: 10 s from 13:45:30.
    write(&mut rtc, REG_SECONDS_ALARM, 0x40);
    write(&mut rtc, REG_MINUTES_ALARM, ALARM_DONT_CARE);
    write(&mut rtc, REG_HOURS_ALARM, ALARM_DONT_CARE);
    assert_eq!(rtc.next_alarm(), Some(Duration::from_secs(T0 + 10)));
    // Every second.
    write(&mut rtc, REG_SECONDS_ALARM, 0xff);
    assert_eq!(rtc.next_alarm(), Some(Duration::from_secs(T0 + 1)));
    // 3 AM in 12-hour BCD: tomorrow.
    write(&mut rtc, REG_B, REG_B_AIE);
    write(&mut rtc, REG_SECONDS_ALARM, 0);
    write(&mut rtc, REG_MINUTES_ALARM, 0);
    write(&mut rtc, REG_HOURS_ALARM, 0x03);
    let at = rtc.next_alarm().unwrap().as_secs();
    assert_eq!(to_datetime(at as i64).hour, 3);
    assert!(at - T0 < 86_400);
    // 3 PM has the PM bit in 12-hour mode: the same byte as 3 AM does not match it.
    write(&mut rtc, REG_HOURS_ALARM, HOUR_PM | 0x03);
    let at = rtc.next_alarm().unwrap().as_secs();
    assert_eq!(to_datetime(at as i64).hour, 15);
    // An alarm that never matches (hour 25).
    write(&mut rtc, REG_HOURS_ALARM, 0x25);
    assert_eq!(rtc.next_alarm(), None);
}

#[test]
fn cmos_ram_keeps_what_the_guest_writes() {
    let (mut rtc, _) = rtc_at(T0, 0);
    write(&mut rtc, 0x40, 0x5a);
    // Bit 7 of the index masks NMIs; it is not part of the index.
    rtc.write(RTC_PORT, 0, &[0x80 | 0x40]);
    let mut b = [0u8; 2];
    rtc.read(RTC_PORT, 1, &mut b);
    assert_eq!(b, [0x5a, 0]);
    write(&mut rtc, REG_D, 0);
    write(&mut rtc, REG_C, 0xff);
    assert_eq!(read(&mut rtc, REG_D), REG_D_VRT, "register D is read-only");
    rtc.write(RTC_PORT, 1, &[]);
}
