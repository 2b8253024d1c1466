//! A small logger: stderr in the foreground, syslog once the daemon is in the background.

use std::sync::atomic::{AtomicBool, Ordering};

use log::{Level, LevelFilter, Log, Metadata, Record};

static SYSLOG: AtomicBool = AtomicBool::new(false);

struct Logger;

impl Log for Logger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // fuser reports every ENOSYS and unknown request at warn level; keep its chatter
        // at debug unless asked for.
        if r.target().starts_with("fuser")
            && r.level() > Level::Error
            && log::max_level() < LevelFilter::Debug
        {
            return;
        }
        let msg = format!("{}", r.args());
        if SYSLOG.load(Ordering::Relaxed) {
            crate::sys::syslog(r.level() as i32, &msg);
        } else {
            // Never eprintln!, which panics when stderr is gone (a closed pipe): the
            // daemon goes on without its log.
            use std::io::Write;
            let level = r.level().as_str().to_lowercase();
            let _ = writeln!(std::io::stderr(), "unionmount: {level}: {msg}");
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Sets the logger up, and has panics (bugs) logged as errors, so that they reach syslog once
/// the daemon is in the background (stderr is gone then).
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        log::error!("panic in thread {}: {info}", thread.name().unwrap_or("?"));
    }));
}

/// Sends further messages to syslog (stderr is gone once the daemon detaches).
pub fn to_syslog() {
    crate::sys::openlog();
    SYSLOG.store(true, Ordering::Relaxed);
}
