//! SIGINT/SIGTERM as a flag, for loops that are not async.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Install the handlers; the returned flag turns true at the first SIGINT or SIGTERM.
pub fn install() -> anyhow::Result<&'static AtomicBool> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            if libc::signal(sig, on_signal as *const () as libc::sighandler_t) == libc::SIG_ERR {
                anyhow::bail!("cannot install a handler for signal {sig}");
            }
        }
    }
    Ok(&STOP)
}
