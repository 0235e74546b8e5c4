//! `containerd-shim-fnvm-v2`: containerd's runtime `io.containerd.fnvm.v2`. A pod of that
//! RuntimeClass (or `ctr run --runtime io.containerd.fnvm.v2`) runs as one fnvm function: its
//! image's rootfs in a micro-VM (the process sandbox where the host has no VMX/SVM), its
//! port 9000 on the pod's network namespace, its output on containerd's fifos.

mod bundle;
mod container;
mod logs;
mod mounts;
mod port;
mod service;

fn main() {
    let config = containerd_shim::Config {
        // fnvm reaps its own sandboxes (a pidfd per child): the crate's reaper, which waits
        // for any child, would take their statuses away.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<service::Service>(service::RUNTIME_ID, Some(config));
}
