//! What of a vsock a snapshot keeps: its CID, listener path and negotiated features.
//! Streams are not saved: a restored guest gets a TRANSPORT_RESET event and sees its
//! connections reset, as the spec intends for migration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Vsock, VsockError};
use crate::devices::Persist;

/// Saved state of a [`Vsock`]. Streams are not saved: a restored guest gets a
/// TRANSPORT_RESET event and sees its connections reset, as the spec intends for migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    pub acked_features: u64,
}

/// What restoring a [`Vsock`] needs: optionally a new listener path for the new VMM process.
#[derive(Clone, Debug, Default)]
pub struct VsockRestoreArgs {
    pub uds_path: Option<PathBuf>,
}

impl Persist for Vsock {
    type State = VsockState;
    type ConstructorArgs = VsockRestoreArgs;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
            uds_path: self.uds_path.clone(),
            acked_features: self.acked_features,
        }
    }

    fn restore(args: VsockRestoreArgs, state: &VsockState) -> Result<Vsock, VsockError> {
        let path = args.uds_path.unwrap_or_else(|| state.uds_path.clone());
        let mut vsock = Vsock::new(state.guest_cid, path)?;
        vsock.acked_features = state.acked_features;
        vsock.transport_reset_pending = true;
        Ok(vsock)
    }
}
