//! What of a virtio-net device a snapshot keeps, and what it deliberately does not.
//!
//! Kept: the MAC (the guest's driver read it at probe and its network stack uses it), the
//! negotiated features, and the rx buffers the device had taken off the queue but not filled
//! yet (plain guest addresses: without them the guest would lose those buffers for good).
//!
//! Not kept: frames in flight in either direction (read from passt but not yet in the guest,
//! or taken from the guest but not yet written to passt), and the connection itself. A
//! restored VM gets a new passt with no flows: its TCP retransmits what was lost, and stale
//! flows end by timeout or reset, as after a brief cable pull. Handing the old frames to the
//! new passt would only replay traffic into flows it does not know.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::rx::RxChain;
use super::{MacAddr, Net, NetError};
use crate::devices::Persist;

/// Saved state of a [`Net`] device (see the module documentation for what is left out).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: MacAddr,
    /// The passt socket the device was connected to.
    pub socket_path: PathBuf,
    pub acked_features: u64,
    /// Rx buffers taken off the queue and not yet used, in queue order.
    pub rx_chains: Vec<RxChain>,
}

/// What restoring a [`Net`] needs: the passt socket of the new VM (each restored instance has
/// its own passt); without one the saved path is tried.
#[derive(Clone, Debug, Default)]
pub struct NetRestoreArgs {
    pub socket_path: Option<PathBuf>,
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetRestoreArgs;
    type Error = NetError;

    fn save(&self) -> NetState {
        NetState {
            mac: self.mac,
            socket_path: self.socket_path.clone(),
            acked_features: self.acked_features,
            rx_chains: self.rx_chains.iter().cloned().collect(),
        }
    }

    fn restore(args: NetRestoreArgs, state: &NetState) -> Result<Net, NetError> {
        let path = args
            .socket_path
            .unwrap_or_else(|| state.socket_path.clone());
        let stream = UnixStream::connect(&path).map_err(|source| NetError::Connect {
            path: path.clone(),
            source,
        })?;
        Net::restore_with_stream(stream, path, state)
    }
}

impl Net {
    /// [`Persist::restore`] on an already connected stream (see [`Net::with_stream`]).
    pub fn restore_with_stream(
        stream: UnixStream,
        path: PathBuf,
        state: &NetState,
    ) -> Result<Net, NetError> {
        let mut net = Net::with_stream(stream, path, state.mac)?;
        net.acked_features = state.acked_features;
        net.rx_chains = state.rx_chains.iter().cloned().collect();
        Ok(net)
    }
}
