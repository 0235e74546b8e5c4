//! The parts of the agent the host shares: the host ↔ agent protocol. The agent binary
//! (`main.rs`) is the guest side; `fnvm` links this library for the host side, so both ends
//! always agree on the wire format.

pub mod protocol;
