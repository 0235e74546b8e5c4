//! Shared fixtures of fnvm's whole-system tests and benchmarks: the real `fnvm` binary as a
//! child process (`fnvm run`, `fnvm serve`), the images they run, where Linux guests run, the
//! leak check, the egress tests' peers: test hosts in network namespaces ([`TestHost`])
//! with real servers in them ([`servers`]), and a containerd of the test's own for the
//! containerd shim's tests ([`Containerd`]). One crate instead of source files included with
//! `#[path]`.
//!
//! The registry fixture lives in its own crate, `fnvm-testkit-registry` (re-exported here as
//! [`registry`]), because rootfs-builder's tests use it too and must not depend on fnvm.

pub mod build;
pub mod containerd;
pub mod echo;
pub mod fixtures;
pub mod images;
pub mod leaks;
pub mod level;
pub mod nethost;
pub mod run;
pub mod serve;
pub mod servers;

pub use fnvm_testkit_registry as registry;

pub use build::{cache_dir, static_binary, target_dir, workspace};
pub use containerd::{Containerd, FNVM_RUNTIME, RUNC_RUNTIME};
pub use echo::{echoed_headers, Echo};
pub use fixtures::{http, serial, Here};
pub use images::{
    busybox_image, busybox_image_with, busybox_oci_archive, debian_netprobe_tarball,
    debian_python_tarball, netprobe_image, python_image, BUSYBOX_ARCHIVE_IMAGE, NETPROBE_SERVER,
    PYTHON_SERVER,
};
pub use leaks::{assert_nothing_left, rootfs_image_of};
pub use level::{cpu_has_flag, host_has_vmx_or_svm, linux_guests_run_here, loud, sandboxes};
pub use nethost::TestHost;
pub use run::{fnvm_command, FnvmRun, Lines};
pub use serve::Serve;
pub use servers::{dns_query_a, Dns, DnsReply, Iperf3, Postgres, TcpListen};
