//! Port 9000 on the pod's network namespace: the listener the function's front serves on, made
//! in the namespace the spec names (a socket stays in the namespace it was made in, so only
//! the thread that makes it enters the namespace, never the shim).

use std::os::fd::AsFd as _;
use std::path::Path;

use crate::bundle::PodNetwork;

/// The function's port, as the contract says.
pub const PORT: u16 = 9000;

/// A listener on `0.0.0.0:9000` in `network` (non-blocking, for the front).
pub fn listen(network: &PodNetwork) -> std::io::Result<std::net::TcpListener> {
    let network = network.clone();
    std::thread::Builder::new()
        .name("pod-netns".into())
        .spawn(move || {
            match &network {
                PodNetwork::Host => {}
                PodNetwork::Join(path) => enter(path)?,
                PodNetwork::New => nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| {
                        std::io::Error::other(format!("cannot make a network namespace: {e}"))
                    })?,
            }
            fnvm::invoke::front::bind(std::net::SocketAddr::from(([0, 0, 0, 0], PORT)))
        })?
        .join()
        .map_err(|_| std::io::Error::other("the network namespace thread panicked"))?
}

/// Moves this thread into the network namespace at `path`.
fn enter(path: &Path) -> std::io::Result<()> {
    let ns = std::fs::File::open(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot open the pod's network namespace {}: {e}",
                path.display()
            ),
        )
    })?;
    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        std::io::Error::other(format!(
            "cannot enter the pod's network namespace {}: {e}",
            path.display()
        ))
    })
}
