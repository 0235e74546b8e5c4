//! The event sources that end a VM, registered in its event loop: a vCPU's reported exit, a
//! stop request, the guest's reset request, a panic banner on the console and a halt message.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::devices::serial::ConsoleWatch;
use crate::error::{io_err, timer_err, VmError};
use crate::event_loop::{EventLoop, Flow};
use crate::exit::{ExitSlot, VmExit};

/// How long a panicking guest gets to reset itself (Linux `panic=1` waits one second) before
/// the VMM ends it anyway.
pub const PANIC_GRACE: Duration = Duration::from_secs(3);

/// Registers the event sources that end the VM: a vCPU's reported exit, a stop request, the
/// guest's reset request, a panic banner on the console (after [`PANIC_GRACE`]) and a halt
/// message.
pub(crate) fn add_ending_events<C>(
    event_loop: &mut EventLoop<C>,
    exit: &Arc<ExitSlot>,
    stop_evt: &Arc<EventFd>,
    reset_evt: &Arc<EventFd>,
    console_watch: &Arc<ConsoleWatch>,
) -> Result<(), VmError> {
    let add = |el: &mut EventLoop<C>, fd: RawFd, h| el.add(fd, h).map_err(io_err("epoll_ctl"));
    {
        let exit = exit.clone();
        add(
            event_loop,
            exit.event().as_raw_fd(),
            Box::new(move |_, _, _| {
                let _ = exit.event().read();
                match exit.peek() {
                    Some(e) => Flow::Exit(e),
                    None => Flow::Continue,
                }
            }),
        )?;
    }
    {
        let stop = stop_evt.clone();
        add(
            event_loop,
            stop_evt.as_raw_fd(),
            Box::new(move |_, _, _| {
                let _ = stop.read();
                Flow::Exit(VmExit::Stopped)
            }),
        )?;
    }
    {
        let reset = reset_evt.clone();
        add(
            event_loop,
            reset_evt.as_raw_fd(),
            Box::new(move |_, _, _| {
                let _ = reset.read();
                Flow::Exit(VmExit::GuestReset)
            }),
        )?;
    }
    {
        // A panic banner arms a timer: the guest normally resets within `panic=` seconds;
        // if it does not (panic=0), the VMM ends it when the timer fires.
        let mut timer = TimerFd::new().map_err(timer_err)?;
        let timer_fd = timer.as_raw_fd();
        let watch = console_watch.clone();
        let watch_fd = console_watch.panic_event().as_raw_fd();
        let mut armed = false;
        add(
            event_loop,
            watch_fd,
            Box::new(move |_, _, _| {
                let _ = watch.panic_event().read();
                if !armed {
                    armed = true;
                    if let Err(e) = timer.reset(PANIC_GRACE, None) {
                        tracing::warn!("cannot arm the panic timer: {e}");
                    }
                }
                Flow::Continue
            }),
        )?;
        let watch = console_watch.clone();
        add(
            event_loop,
            timer_fd,
            Box::new(move |_, _, _| {
                Flow::Exit(VmExit::GuestPanic {
                    message: watch.message().unwrap_or_default(),
                })
            }),
        )?;
    }
    {
        // "reboot: Power down" / "System halted": the guest is done and about to halt
        // forever with interrupts off; end the VM as a clean shutdown.
        let watch = console_watch.clone();
        add(
            event_loop,
            console_watch.halt_event().as_raw_fd(),
            Box::new(move |_, _, _| {
                let _ = watch.halt_event().read();
                Flow::Exit(VmExit::GuestShutdown)
            }),
        )?;
    }
    Ok(())
}
