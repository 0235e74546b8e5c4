//! The few helpers the clone(2)d child's system calls share: errno and result checks, all
//! async-signal-safe (no allocation, no locks).

use libc::c_char;

/// This thread's errno.
pub(super) fn errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot; reading it is always valid.
    unsafe { *libc::__errno_location() }
}

/// Err(errno) for a failed libc call.
pub(super) fn check(rc: libc::c_int) -> Result<(), i32> {
    if rc < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// Err(errno) for a failed raw system call.
pub(super) fn check_syscall(rc: libc::c_long) -> Result<(), i32> {
    if rc < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// The pointer of an optional C string; NULL for none.
pub(super) fn opt_ptr(s: &Option<std::ffi::CString>) -> *const c_char {
    s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
}
