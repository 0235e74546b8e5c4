//! The VMM's one event loop: an epoll set of file descriptors (eventfds for vCPU exits, the
//! guest's reset request, virtio queue notifications through ioeventfds, stdin, timers), each
//! with a handler. It blocks in `epoll_wait` with no timeout, so an idle VM costs no CPU.
//!
//! The loop runs with a context `C` (the VM's [`crate::machine::Machine`]) that every handler
//! is given: a handler that answers an API request works on the VM itself, never on a copy,
//! and never races another handler.

use std::io;
use std::os::fd::RawFd;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::exit::VmExit;

/// What a handler wants the loop to do next.
#[derive(Debug)]
pub enum Flow {
    Continue,
    /// End the loop: the VM is over.
    Exit(VmExit),
}

/// Identifies a registered file descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token(usize);

/// A handler's view of the loop's event sources: it may pause, resume or drop them (e.g. stop
/// reading stdin while the guest's receive FIFO is full, so a level-triggered fd does not
/// spin) and add new ones.
pub struct Registry<'a, C> {
    epoll: &'a Epoll,
    fds: &'a mut Vec<Option<RawFd>>,
    /// Handlers added by this handler, installed when it returns.
    added: &'a mut Vec<Handler<C>>,
    base: usize,
}

impl<C> Registry<'_, C> {
    fn set(&mut self, token: Token, events: EventSet) -> io::Result<()> {
        if let Some(Some(fd)) = self.fds.get(token.0) {
            self.epoll.ctl(
                ControlOperation::Modify,
                *fd,
                EpollEvent::new(events, token.0 as u64),
            )?;
        }
        Ok(())
    }

    /// Stops delivering events for `token` until [`Registry::resume`].
    pub fn pause(&mut self, token: Token) -> io::Result<()> {
        self.set(token, EventSet::empty())
    }

    pub fn resume(&mut self, token: Token) -> io::Result<()> {
        self.set(token, EventSet::IN)
    }

    /// Registers another fd from inside a handler (e.g. an accepted API connection).
    pub fn add(&mut self, fd: RawFd, handler: Handler<C>) -> io::Result<Token> {
        let token = self.base + self.added.len();
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token as u64),
        )?;
        self.fds.push(Some(fd));
        self.added.push(handler);
        Ok(Token(token))
    }

    /// Unregisters `token` for good (e.g. stdin reached end of file).
    pub fn remove(&mut self, token: Token) -> io::Result<()> {
        if let Some(slot) = self.fds.get_mut(token.0) {
            if let Some(fd) = slot.take() {
                self.epoll.ctl(
                    ControlOperation::Delete,
                    fd,
                    EpollEvent::new(EventSet::empty(), 0),
                )?;
            }
        }
        Ok(())
    }
}

/// A handler gets the loop's context, its registry and the token it was registered with.
pub type Handler<C> = Box<dyn FnMut(&mut C, &mut Registry<'_, C>, Token) -> Flow + Send>;

pub struct EventLoop<C> {
    epoll: Epoll,
    fds: Vec<Option<RawFd>>,
    handlers: Vec<Handler<C>>,
}

impl<C> std::fmt::Debug for EventLoop<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop").field("fds", &self.fds).finish()
    }
}

impl<C> EventLoop<C> {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            epoll: Epoll::new()?,
            fds: Vec::new(),
            handlers: Vec::new(),
        })
    }

    /// Calls `handler` whenever `fd` is readable. The fd must stay open while registered
    /// (handlers usually own it).
    pub fn add(&mut self, fd: RawFd, handler: Handler<C>) -> io::Result<Token> {
        let token = self.handlers.len();
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token as u64),
        )?;
        self.fds.push(Some(fd));
        self.handlers.push(handler);
        Ok(Token(token))
    }

    /// Dispatches events until a handler returns [`Flow::Exit`]; handlers see `context`.
    pub fn run(&mut self, context: &mut C) -> io::Result<VmExit> {
        let mut events = vec![EpollEvent::default(); 32];
        let mut added: Vec<Handler<C>> = Vec::new();
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for event in &events[..n] {
                let index = event.data() as usize;
                let base = self.handlers.len();
                let Some(handler) = self.handlers.get_mut(index) else {
                    continue;
                };
                if self.fds[index].is_none() {
                    continue;
                }
                let mut registry = Registry {
                    epoll: &self.epoll,
                    fds: &mut self.fds,
                    added: &mut added,
                    base,
                };
                let flow = handler(context, &mut registry, Token(index));
                self.handlers.append(&mut added);
                if let Flow::Exit(exit) = flow {
                    return Ok(exit);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn handlers_run_until_one_exits() {
        let mut el = EventLoop::<()>::new().unwrap();
        let a = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let b = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        {
            let (a2, b2, count) = (a.clone(), b.clone(), count.clone());
            el.add(
                a.as_raw_fd(),
                Box::new(move |_, _, _| {
                    let _ = a2.read();
                    if count.fetch_add(1, Ordering::SeqCst) == 2 {
                        b2.write(1).unwrap();
                    } else {
                        a2.write(1).unwrap();
                    }
                    Flow::Continue
                }),
            )
            .unwrap();
        }
        let b2 = b.clone();
        el.add(
            b.as_raw_fd(),
            Box::new(move |_, _, _| {
                let _ = b2.read();
                Flow::Exit(VmExit::GuestReset)
            }),
        )
        .unwrap();
        a.write(1).unwrap();
        assert_eq!(el.run(&mut ()).unwrap(), VmExit::GuestReset);
        assert_eq!(count.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn paused_sources_are_not_dispatched() {
        let mut el = EventLoop::<()>::new().unwrap();
        let noisy = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let done = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let (c, d) = (calls.clone(), done.clone());
        // Never drains its eventfd: without pause this would be called forever.
        el.add(
            noisy.as_raw_fd(),
            Box::new(move |_, ctl, token| {
                c.fetch_add(1, Ordering::SeqCst);
                ctl.pause(token).unwrap();
                d.write(1).unwrap();
                Flow::Continue
            }),
        )
        .unwrap();
        el.add(
            done.as_raw_fd(),
            Box::new(|_, _, _| Flow::Exit(VmExit::Stopped)),
        )
        .unwrap();
        noisy.write(1).unwrap();
        assert_eq!(el.run(&mut ()).unwrap(), VmExit::Stopped);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn handlers_work_on_the_loop_context() {
        let mut el = EventLoop::<Vec<u32>>::new().unwrap();
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let e = evt.clone();
        el.add(
            evt.as_raw_fd(),
            Box::new(move |seen: &mut Vec<u32>, _, _| {
                let _ = e.read();
                seen.push(7);
                Flow::Exit(VmExit::Stopped)
            }),
        )
        .unwrap();
        evt.write(1).unwrap();
        let mut seen = Vec::new();
        assert_eq!(el.run(&mut seen).unwrap(), VmExit::Stopped);
        assert_eq!(seen, [7]);
    }
}
