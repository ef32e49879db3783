//! SIGINT/SIGTERM as a flag, for loops that are not async.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Install the handlers; the returned flag turns true at the first SIGINT or SIGTERM.
pub fn install() -> anyhow::Result<Arc<AtomicBool>> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            if libc::signal(sig, on_signal as *const () as libc::sighandler_t) == libc::SIG_ERR {
                anyhow::bail!("cannot install a handler for signal {sig}");
            }
        }
    }
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::spawn(move || loop {
        if STOP.load(Ordering::SeqCst) {
            f.store(true, Ordering::SeqCst);
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    });
    Ok(flag)
}
