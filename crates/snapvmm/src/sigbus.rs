//! A lazily restored VM's RAM is its snapshot image mapped privately: pages are
//! read from the file on first touch. If the file is truncated under the VM, a
//! touch past the new end raises SIGBUS in whichever thread made it. Instead of
//! dying silently, snapvmm says why on stderr and exits with status 1.

use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

static MSG: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static MSG_LEN: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_sigbus(_sig: libc::c_int) {
    let ptr = MSG.load(Ordering::SeqCst);
    let len = MSG_LEN.load(Ordering::SeqCst);
    if !ptr.is_null() {
        // SAFETY: `ptr`/`len` describe a leaked, never-freed byte string (set
        // before the handler was installed); write(2) and _exit(2) are
        // async-signal-safe.
        unsafe { libc::write(2, ptr as *const libc::c_void, len) };
    }
    // SAFETY: _exit ends the process at once, without running anything else.
    unsafe { libc::_exit(1) };
}

/// From now on, a SIGBUS ends the process with a message naming `image`.
pub fn explain_for(image: &Path) {
    let text = format!(
        "snapvmm: error: guest RAM became unreadable (SIGBUS): the snapshot image {} that backs it \
         was truncated or replaced in place while the VM ran\n",
        image.display()
    );
    let leaked: &'static mut [u8] = Box::leak(text.into_bytes().into_boxed_slice());
    MSG_LEN.store(leaked.len(), Ordering::SeqCst);
    MSG.store(leaked.as_mut_ptr(), Ordering::SeqCst);
    // SAFETY: installs a handler that only calls async-signal-safe functions and
    // reads statics set above; the sigaction struct is fully initialised.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}
