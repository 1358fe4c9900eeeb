//! Rate-limited logging for lines a guest can trigger at will (a bad register access, a refused
//! BAR move, a malformed descriptor): without a bound, a guest repeating the access fills the
//! host's disk with the VMM's log.
//!
//! Each call site of [`warn_limited!`](crate::warn_limited) (and its siblings) logs its first
//! [`BURST`] lines, then at most one line per [`REPORT_INTERVAL`], which also says how many lines
//! like it were suppressed since the last one. The hot path is one relaxed atomic add, plus a
//! clock read once the burst is spent; nothing at all when the level is not enabled.
//!
//! ```
//! use vm_device::warn_limited;
//! let offset = 0x1234;
//! warn_limited!("MSI-X table write at {offset:#x} ignored");
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[doc(hidden)]
pub use log as __log;

/// Lines a call site logs before it is limited.
pub const BURST: u64 = 10;
/// Once limited, a call site logs at most one line (with the count of those it suppressed) per
/// this interval.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Whether a line is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` lines like it were dropped since the last one logged.
    Log { suppressed: u64 },
    /// Drop it (it is counted).
    Suppress,
}

/// The state of one call site.
#[derive(Debug, Default)]
pub struct LogLimit {
    /// Lines seen, logged or not.
    seen: AtomicU64,
    /// Lines dropped since the last one logged.
    suppressed: AtomicU64,
    /// When the next line may be logged, in milliseconds since [`epoch`]; 0 until the burst is
    /// spent.
    next_report_ms: AtomicU64,
}

/// The clock call sites share (any fixed instant would do).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl LogLimit {
    /// A call site that has logged nothing yet.
    pub const fn new() -> Self {
        Self {
            seen: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            next_report_ms: AtomicU64::new(0),
        }
    }

    /// The verdict for one more line now.
    pub fn check(&self) -> Verdict {
        if self.seen.load(Ordering::Relaxed) < BURST {
            return self.check_at(0);
        }
        let now = epoch().elapsed().as_millis();
        self.check_at(u64::try_from(now).unwrap_or(u64::MAX))
    }

    /// The verdict for one more line at `now_ms` (milliseconds on any monotonic clock that
    /// starts above zero once the burst is spent).
    pub fn check_at(&self, now_ms: u64) -> Verdict {
        let seen = self.seen.fetch_add(1, Ordering::Relaxed);
        if seen < BURST {
            return Verdict::Log { suppressed: 0 };
        }
        let interval = REPORT_INTERVAL.as_millis() as u64;
        let due = self.next_report_ms.load(Ordering::Relaxed);
        let next = now_ms.saturating_add(interval).max(1);
        // The first line past the burst arms the report; one thread wins each report.
        let report = due != 0
            && now_ms >= due
            && self
                .next_report_ms
                .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if report {
            return Verdict::Log {
                suppressed: self.suppressed.swap(0, Ordering::Relaxed),
            };
        }
        if due == 0 {
            let _ =
                self.next_report_ms
                    .compare_exchange(0, next, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        Verdict::Suppress
    }
}

/// Logs at `level` like `log::log!`, limited per call site (see the [module](self) doc).
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::LogLimit = $crate::ratelimit::LogLimit::new();
        $crate::log_limited_by!(&LIMIT, $level, $($arg)+)
    }};
}

/// Logs at `level` like `log::log!`, limited by the [`LogLimit`] `limit` rather than per call
/// site: one site that logs several kinds of line keeps a limit for each kind.
#[macro_export]
macro_rules! log_limited_by {
    ($limit:expr, $level:expr, $($arg:tt)+) => {{
        let limit: &$crate::ratelimit::LogLimit = $limit;
        let level: $crate::ratelimit::__log::Level = $level;
        if $crate::ratelimit::__log::log_enabled!(level) {
            match limit.check() {
                $crate::ratelimit::Verdict::Log { suppressed: 0 } => {
                    $crate::ratelimit::__log::log!(level, $($arg)+)
                }
                $crate::ratelimit::Verdict::Log { suppressed } => {
                    $crate::ratelimit::__log::log!(
                        level,
                        "{} ({} more like this suppressed)",
                        format_args!($($arg)+),
                        suppressed
                    )
                }
                $crate::ratelimit::Verdict::Suppress => {}
            }
        }
    }};
}

/// `log::error!`, limited per call site.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::ratelimit::__log::Level::Error, $($arg)+) };
}

/// `log::warn!`, limited per call site.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::ratelimit::__log::Level::Warn, $($arg)+) };
}

/// `log::warn!`, limited by the [`LogLimit`] given first (see [`log_limited_by!`]).
#[macro_export]
macro_rules! warn_limited_by {
    ($limit:expr, $($arg:tt)+) => {
        $crate::log_limited_by!($limit, $crate::ratelimit::__log::Level::Warn, $($arg)+)
    };
}

/// `log::info!`, limited per call site.
#[macro_export]
macro_rules! info_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::ratelimit::__log::Level::Info, $($arg)+) };
}

/// `log::debug!`, limited per call site.
#[macro_export]
macro_rules! debug_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::ratelimit::__log::Level::Debug, $($arg)+) };
}

/// `log::trace!`, limited per call site.
#[macro_export]
macro_rules! trace_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::ratelimit::__log::Level::Trace, $($arg)+) };
}

/// A logger that records, per thread, the lines logged while a capture is open: tests of crates
/// using the macros count what a burst of guest accesses logs.
#[cfg(any(test, feature = "testing"))]
pub mod capture {
    use std::cell::RefCell;

    thread_local! {
        static LINES: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
    }

    struct ThreadCapture;

    impl log::Log for ThreadCapture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }

        fn log(&self, record: &log::Record<'_>) {
            LINES.with(|l| {
                if let Some(lines) = l.borrow_mut().as_mut() {
                    lines.push(format!("{} {}", record.level(), record.args()));
                }
            });
        }

        fn flush(&self) {}
    }

    static LOGGER: ThreadCapture = ThreadCapture;

    /// Runs `f` and returns the lines it logged on this thread, at any level. Installs the
    /// capturing logger if no logger is installed yet; panics if another one is (the count
    /// would be meaningless).
    pub fn lines_logged_by(f: impl FnOnce()) -> Vec<String> {
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
        assert_eq!(
            log::max_level(),
            log::LevelFilter::Trace,
            "another logger is installed: cannot capture log lines"
        );
        LINES.with(|l| *l.borrow_mut() = Some(Vec::new()));
        f();
        LINES.with(|l| l.borrow_mut().take().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_logs_its_burst_then_one_line_per_interval_with_the_count() {
        let site = LogLimit::new();
        let interval = REPORT_INTERVAL.as_millis() as u64;
        for _ in 0..BURST {
            assert_eq!(site.check_at(5), Verdict::Log { suppressed: 0 });
        }
        for _ in 0..1000 {
            assert_eq!(site.check_at(10), Verdict::Suppress);
        }
        assert_eq!(site.check_at(10 + interval - 1), Verdict::Suppress);
        assert_eq!(
            site.check_at(10 + interval),
            Verdict::Log { suppressed: 1001 }
        );
        assert_eq!(site.check_at(10 + interval + 1), Verdict::Suppress);
        assert_eq!(
            site.check_at(10 + 3 * interval),
            Verdict::Log { suppressed: 1 }
        );
    }

    #[test]
    fn a_limit_shared_by_a_call_site_bounds_each_kind_on_its_own() {
        static KINDS: [LogLimit; 2] = [LogLimit::new(), LogLimit::new()];
        let lines = capture::lines_logged_by(|| {
            for i in 0..1000 {
                warn_limited_by!(&KINDS[i % 2], "kind {} line {i}", i % 2);
            }
        });
        assert_eq!(lines.len(), 2 * BURST as usize, "{lines:?}");
        assert_eq!(
            lines.iter().filter(|l| l.contains("kind 1")).count(),
            BURST as usize
        );
    }

    #[test]
    fn the_macro_bounds_what_a_flood_logs_per_call_site() {
        let lines = capture::lines_logged_by(|| {
            for i in 0..10_000 {
                warn_limited!("bad access {i}");
                debug_limited!("other site {i}");
            }
        });
        let warns = lines.iter().filter(|l| l.starts_with("WARN")).count();
        let debugs = lines.iter().filter(|l| l.starts_with("DEBUG")).count();
        assert_eq!(
            (warns, debugs),
            (BURST as usize, BURST as usize),
            "{lines:?}"
        );
        assert_eq!(lines[0], "WARN bad access 0");
    }
}
