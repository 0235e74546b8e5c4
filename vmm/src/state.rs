//! Save and restore of device and vCPU state, the building block of snapshots.
//!
//! Every stateful part of the VM keeps its state as a plain serde struct and implements
//! [`Persist`], so a snapshot is the serialisation of those structs plus guest memory.

use serde::{de::DeserializeOwned, Serialize};

/// A component whose state can be saved and later rebuilt in a fresh VMM process.
pub trait Persist: Sized {
    /// Plain data: no file descriptors, no pointers, no host addresses.
    type State: Serialize + DeserializeOwned;
    /// What the restore needs besides the state (guest memory, interrupt lines, backing files).
    type ConstructorArgs;
    /// Why a restore was refused.
    type Error: std::error::Error;

    /// Captures the current state. The VM is paused while this runs.
    fn save(&self) -> Self::State;

    /// Rebuilds the component from a saved state.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
