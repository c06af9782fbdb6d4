//! Kiln's diagnostics: the `log` crate's levelled macros, printed by
//! env_logger as `kiln: <level>: <message>` on stderr, and a per-call-site
//! rate limit (`warn_limited!`, `error_limited!`) for the lines
//! a guest can trigger at will: a malformed descriptor chain, an unknown
//! register access, a bad packet, an I/O error it provokes request after
//! request. Without the limit a guest could fill the host's disk with the
//! VMM's stderr, or slow its own device emulation to a crawl writing it.
//!
//! The VM process's threads run under seccomp filters ([`crate::seccomp`])
//! that allow write(2) but not what a logger's setup may do (a vCPU
//! thread may open no file, query no terminal). So the logger is
//! installed in `main`, before any filter, and from then on only formats
//! into a buffer and writes it to stderr: no timestamps (no timezone
//! files to read), no colours (no terminal to query).
use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The environment variable that chooses which lines are printed, in
/// env_logger's syntax (`KILN_LOG=info`, `KILN_LOG=kiln_vmm::devices=debug`).
/// Unset, warnings and errors are.
pub const LOG_ENV: &str = "KILN_LOG";

/// The most lines one rate-limited call site prints per [`LIMIT_INTERVAL`]:
/// enough to show what a misbehaving guest does, few enough that it
/// cannot flood the log.
pub const LIMIT_BURST: u64 = 10;

/// The interval over which [`LIMIT_BURST`] applies.
pub const LIMIT_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the process's logger; call it once, in `main`, before any
/// thread installs its seccomp filter.
pub fn init() {
    env_logger::Builder::new()
        .parse_env(env_logger::Env::new().filter_or(LOG_ENV, "warn"))
        .write_style(env_logger::WriteStyle::Never)
        .format(|out, record| {
            writeln!(
                out,
                "kiln: {}: {}",
                level_name(record.level()),
                record.args()
            )
        })
        .init();
    // Set the rate limiters' clock now, so that no filtered thread is
    // the first to.
    epoch();
}

/// A level as `KILN_LOG` spells it.
fn level_name(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "error",
        log::Level::Warn => "warn",
        log::Level::Info => "info",
        log::Level::Debug => "debug",
        log::Level::Trace => "trace",
    }
}

/// The instant the rate limiters count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// One call site's rate limit: at most [`LIMIT_BURST`] lines per
/// [`LIMIT_INTERVAL`], counting the lines held back so that the next line
/// let through can say how many there were.
///
/// Hand-written rather than a crate: it is three atomics in a static per
/// call site, lock-free so that vCPU threads logging at once never wait
/// on each other, and it makes no system call a seccomp filter would
/// refuse. Firecracker rate-limits its guest-triggerable log lines the
/// same way, in its own logger.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    /// When the current interval started, in milliseconds since [`epoch`].
    interval_start: AtomicU64,
    /// Lines that asked to go out in the current interval.
    asked: AtomicU64,
    /// Lines held back since the last one let through.
    suppressed: AtomicU64,
}

impl RateLimiter {
    /// A limiter whose first interval starts at the first line.
    pub(crate) const fn new() -> Self {
        Self {
            interval_start: AtomicU64::new(0),
            asked: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may go out now: `Some(n)`, where `n` lines were held
    /// back since the last one that went out, or `None` to hold it back.
    pub(crate) fn admit(&self) -> Option<u64> {
        let now = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX);
        self.admit_at(now)
    }

    fn admit_at(&self, now_ms: u64) -> Option<u64> {
        let interval_ms = LIMIT_INTERVAL.as_millis() as u64;
        let start = self.interval_start.load(Ordering::Relaxed);
        // One thread starts the new interval; the others count in it. A
        // line racing the reset may land in either interval: the limit is
        // approximate by a line or two, never unbounded.
        if now_ms.saturating_sub(start) >= interval_ms
            && self
                .interval_start
                .compare_exchange(start, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.asked.store(0, Ordering::Relaxed);
        }
        if self.asked.fetch_add(1, Ordering::Relaxed) < LIMIT_BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `log::log!($level, ...)`, rate-limited per call site by a
/// [`RateLimiter`] of its own; the first line after some were held back
/// ends with how many.
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::logger::RateLimiter = $crate::logger::RateLimiter::new();
        // A line that would not be printed anyway uses up no allowance.
        if ::log::log_enabled!($level) {
            match LIMITER.admit() {
                Some(0) => ::log::log!($level, $($arg)+),
                Some(suppressed) => ::log::log!(
                    $level,
                    "{} ({} more like it suppressed)",
                    format_args!($($arg)+),
                    suppressed
                ),
                None => {}
            }
        }
    }};
}

/// `log::warn!`, rate-limited per call site: for what a guest can trigger
/// at will (see [`RateLimiter`]).
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::logger::log_limited!(::log::Level::Warn, $($arg)+) };
}

/// `log::error!`, rate-limited per call site: for host failures a guest
/// can make recur at will, such as a disk's I/O errors on every request.
macro_rules! error_limited {
    ($($arg:tt)+) => { $crate::logger::log_limited!(::log::Level::Error, $($arg)+) };
}

pub(crate) use {error_limited, log_limited, warn_limited};

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const INTERVAL_MS: u64 = LIMIT_INTERVAL.as_millis() as u64;

    #[test]
    fn a_burst_goes_through_then_lines_are_held_back_until_the_interval_ends() {
        let limiter = RateLimiter::new();
        for _ in 0..LIMIT_BURST {
            assert_eq!(limiter.admit_at(1), Some(0));
        }
        for _ in 0..3 {
            assert_eq!(limiter.admit_at(2), None);
        }
        assert_eq!(limiter.admit_at(INTERVAL_MS - 1), None);
        // A new interval: the first line says how many were held back,
        // the next ones that none were since.
        assert_eq!(limiter.admit_at(INTERVAL_MS + 1), Some(4));
        assert_eq!(limiter.admit_at(INTERVAL_MS + 2), Some(0));
    }

    #[test]
    fn threads_racing_for_one_call_site_share_its_burst() {
        let limiter = RateLimiter::new();
        let admitted = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..1000).filter(|_| limiter.admit_at(7).is_some()).count() as u64
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|thread| thread.join().unwrap())
                .sum::<u64>()
        });
        assert_eq!(admitted, LIMIT_BURST);
        assert_eq!(limiter.admit_at(7 + INTERVAL_MS), Some(4000 - LIMIT_BURST));
    }

    /// Records the lines logged from this module; every other module's
    /// lines (other tests run in the same process) are not even enabled.
    struct Capture(Mutex<Vec<String>>);

    impl log::Log for Capture {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.target() == module_path!()
        }
        fn log(&self, record: &log::Record<'_>) {
            if self.enabled(record.metadata()) {
                self.0.lock().unwrap().push(record.args().to_string());
            }
        }
        fn flush(&self) {}
    }

    static CAPTURED: Capture = Capture(Mutex::new(Vec::new()));

    #[test]
    fn each_call_site_has_its_own_limit() {
        log::set_logger(&CAPTURED).unwrap();
        log::set_max_level(log::LevelFilter::Warn);
        for i in 0..2 * LIMIT_BURST {
            warn_limited!("guest line {i}");
            error_limited!("host line {i}");
        }
        let lines = CAPTURED.0.lock().unwrap();
        let from = |prefix: &str| -> Vec<&str> {
            lines
                .iter()
                .filter(|line| line.starts_with(prefix))
                .map(String::as_str)
                .collect()
        };
        let expected = |prefix: &str| -> Vec<String> {
            (0..LIMIT_BURST).map(|i| format!("{prefix} {i}")).collect()
        };
        assert_eq!(from("guest line"), expected("guest line"));
        assert_eq!(from("host line"), expected("host line"));
    }
}
