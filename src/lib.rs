//! The fnvm library: everything the `fnvm` binary runs, as modules the binary, the whole-system
//! tests (through `fnvm-testkit`) and the benchmarks link instead of including source files.
//!
//! The command line itself (clap's `Cli` and `cli/`, with `anyhow` for its errors) stays in the
//! binary, `src/main.rs`.

pub mod agent_binary;
pub mod example_image;
pub mod function;
pub mod home;
pub mod http_server;
pub mod invoke;
pub mod kernel;
pub mod network;
pub mod oci_layout;
pub mod sandbox;
pub mod service;
