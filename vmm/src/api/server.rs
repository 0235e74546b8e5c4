//! The running VM's API server, in its event loop: the socket's connections and the
//! in-process channel ([`super::handle`]) both end in [`answer`], which works on the VM's
//! [`Machine`] itself (so a request never races a device handler).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use super::handle::{ApiChannel, Envelope};
use super::{decode_request, encode_response, Request, Response, MAX_LINE};
use crate::event_loop::{EventLoop, Flow, Handler, Registry};
use crate::machine::Machine;

/// Answers one request on the VM's machine.
pub fn answer(
    machine: &mut Machine,
    sources: &mut Registry<'_, Machine>,
    req: Request,
) -> Response {
    match req {
        Request::Pause => match machine.pause(sources) {
            Ok(()) => Response::ok(),
            Err(e) => Response::err(e),
        },
        Request::Resume => {
            machine.resume(sources);
            Response::ok()
        }
        Request::Snapshot { dir } => {
            let was_paused = machine.is_paused();
            if !was_paused {
                if let Err(e) = machine.pause(sources) {
                    return Response::err(e);
                }
            }
            let t = Instant::now();
            let result = machine.capture(&dir);
            if !was_paused {
                machine.resume(sources);
            }
            match result {
                Ok(()) => Response {
                    snapshot_ms: Some(t.elapsed().as_secs_f64() * 1000.0),
                    ..Response::ok()
                },
                Err(e) => Response::err(e),
            }
        }
        Request::Restore { .. } => Response::err(
            "this VM is already running: only a standby fnvm-vmm (--standby) restores",
        ),
        Request::ForbiddenSyscall => Response::err(crate::confine::violation::forbidden_syscall()),
        Request::Metrics => Response {
            paused: Some(machine.is_paused()),
            restore: machine.restore_metrics(),
            ..Response::ok()
        },
    }
}

/// Serves the in-process channel's requests.
pub fn serve_channel(event_loop: &mut EventLoop<Machine>, channel: ApiChannel) -> io::Result<()> {
    let ApiChannel { rx, wake, .. } = channel;
    let fd = wake.as_raw_fd();
    event_loop.add(
        fd,
        Box::new(move |machine, sources, _| {
            let _ = wake.read();
            while let Ok(Envelope { request, reply }) = rx.try_recv() {
                let _ = reply.send(answer(machine, sources, request));
            }
            Flow::Continue
        }),
    )?;
    Ok(())
}

/// Serves the API socket: accepts connections and answers one JSON line per request line.
pub fn serve_socket(event_loop: &mut EventLoop<Machine>, listener: UnixListener) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let fd = listener.as_raw_fd();
    event_loop.add(
        fd,
        Box::new(move |_, sources, _| {
            while let Ok((stream, _)) = listener.accept() {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                let raw: RawFd = stream.as_raw_fd();
                if let Err(e) = sources.add(raw, connection_handler(stream)) {
                    tracing::warn!("API connection dropped: {e}");
                }
            }
            Flow::Continue
        }),
    )?;
    Ok(())
}

fn connection_handler(mut stream: UnixStream) -> Handler<Machine> {
    let mut buf: Vec<u8> = Vec::new();
    let mut open = true;
    Box::new(move |machine, sources, token| {
        if !open {
            return Flow::Continue;
        }
        let mut chunk = [0u8; 4096];
        let mut closed = false;
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let resp = match decode_request(&line) {
                None => continue,
                Some(Ok(req)) => answer(machine, sources, req),
                Some(Err(e)) => Response::err(format!(
                    "{e} (ops: pause, resume, snapshot {{dir}}, metrics, \
                     restore {{dir, disks, vsock}})"
                )),
            };
            let out = encode_response(&resp);
            // Replies are small; a client that does not read them loses its connection.
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            if stream.write_all(&out).is_err() {
                closed = true;
                break;
            }
            let _ = stream.set_nonblocking(true);
        }
        if buf.len() > MAX_LINE {
            closed = true;
        }
        if closed {
            open = false;
            let _ = sources.remove(token);
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        Flow::Continue
    })
}
