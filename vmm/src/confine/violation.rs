//! What happens when a confined thread makes a call outside its allow-list: the filter traps
//! (SIGSYS), and this handler writes one line naming the thread and the call to stderr and
//! ends the process with [`code::SECCOMP_VIOLATION`]. Nothing else runs: the thread that
//! trapped may be running code a guest took over.
//!
//! Also the test-only trigger: a VMM started with `FNVM_VMM_TEST_TRIGGERS=1` answers the API
//! request `{"op":"forbidden_syscall"}` by making a call no filter allows, so tests can check
//! that a violation stops the VMM and that fnvm notices.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use crate::exit::code;

thread_local! {
    /// This thread's name for the report (const-initialised: reading it in a signal handler
    /// touches only the thread's TLS block).
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

static TEST_TRIGGERS: AtomicBool = AtomicBool::new(false);

/// Notes `name` as the calling thread's name in reports (at most 15 bytes kept).
pub(super) fn name_thread(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    NAME.with(|c| c.set(buf));
}

/// Installs the SIGSYS handler for the process (once).
pub(super) fn install_handler() -> io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with an SA_SIGINFO handler that only formats into a
        // stack buffer, calls write(2) and _exit(2); the struct lives across the call.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
                result = Err(io::Error::last_os_error());
            }
        }
    });
    result
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86-64: signo, errno, code (3 × i32)
/// and padding, then `_sigsys { void *_call_addr; int _syscall; unsigned _arch; }`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a full siginfo_t (128 bytes) for SA_SIGINFO handlers; a
        // SIGSYS from seccomp fills `_sigsys`, read here as an unaligned i32.
        unsafe {
            std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL_OFFSET).cast::<i32>())
        }
    };
    let mut line = Line::default();
    line.push(b"fnvm-vmm: seccomp violation: thread ");
    let name = NAME.with(|c| c.get());
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    line.push(if len == 0 { b"?" } else { &name[..len] });
    line.push(b" made system call ");
    line.number(nr);
    line.push(b", which its filter does not allow; the VMM stops\n");
    // SAFETY: write(2) of a stack buffer and _exit(2): both async-signal-safe, and both in
    // every thread's allow-list.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(i32::from(code::SECCOMP_VIOLATION));
    }
}

/// A fixed buffer a signal handler can format into.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 192],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn number(&mut self, n: i32) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 10];
        let mut v = n.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Turns the test trigger on (`FNVM_VMM_TEST_TRIGGERS=1` at start; see the module header).
pub fn enable_test_trigger() {
    TEST_TRIGGERS.store(true, Ordering::Relaxed);
}

/// The test trigger: makes a call no filter allows (`setns(-1, 0)`, harmless if it went
/// through: EBADF). Returns (why it did not stop the VMM) only when the trigger is off or
/// no filter stopped the call.
pub fn forbidden_syscall() -> &'static str {
    if !TEST_TRIGGERS.load(Ordering::Relaxed) {
        return "test triggers are off (start fnvm-vmm with FNVM_VMM_TEST_TRIGGERS=1)";
    }
    // SAFETY: setns with an invalid fd and no flags changes nothing; it fails with EBADF.
    unsafe { libc::syscall(libc::SYS_setns, -1, 0) };
    "the forbidden system call was not stopped: this VMM runs without seccomp"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_line_formats_numbers_and_stays_in_its_buffer() {
        let mut line = Line::default();
        line.number(0);
        line.push(b" ");
        line.number(308);
        line.push(b" ");
        line.number(-1);
        assert_eq!(&line.buf[..line.len], b"0 308 -1");
        let mut long = Line::default();
        for _ in 0..100 {
            long.push(b"abcdef");
        }
        assert_eq!(long.len, long.buf.len());
    }

    #[test]
    fn the_trigger_is_off_unless_enabled() {
        assert!(forbidden_syscall().contains("off"));
    }
}
