//! virtio-net bridged to [passt](https://passt.top) over its Unix-socket protocol.
//!
//! Why passt: it gives a guest outbound TCP/UDP/ICMP through ordinary host sockets with no
//! privileges, no tap device and no bridge, one passt process per VM. It speaks the protocol
//! QEMU's `-netdev stream` speaks: one stream Unix socket, every Ethernet frame preceded by its
//! length as a 32-bit big-endian number. [`backend`] is that protocol, buffered and
//! non-blocking; the rest is the virtio device.
//!
//! What the guest is offered, and why (Linux's driver gets most of its throughput from these):
//! - `VIRTIO_NET_F_MAC` and `VIRTIO_NET_F_STATUS`: a fixed MAC (kept across snapshots, the
//!   guest's driver holds it) and a link that is always up.
//! - `VIRTIO_NET_F_MTU` = [`MTU`] (65520, passt's own default): TCP segments of ~64 KiB without
//!   any segmentation offload, which is what TSO would buy, at no cost here. Without it the
//!   guest would use 1500 bytes (the `ip=` kernel argument cannot set an MTU).
//! - `VIRTIO_NET_F_MRG_RXBUF`: a frame from passt is spread over as many of the guest's
//!   (page-sized) rx buffers as it needs, `num_buffers` in its header.
//! - `VIRTIO_NET_F_CSUM`: the guest may hand over frames with a partial checksum (the pseudo
//!   header's sum at `csum_start + csum_offset`); the device completes it before the frame
//!   goes to passt, which expects complete frames.
//!
//! Not offered: `GUEST_CSUM` (the device would have to verify every checksum itself to set
//! DATA_VALID truthfully: the same work as the guest's, on the same host cores), TSO/UFO/GSO in
//! either direction (segmentation would have to be implemented here; the 65520-byte MTU gets
//! the same large segments), a control queue, multiqueue, EVENT_IDX and indirect descriptors
//! (the transport supports neither).
//!
//! Everything from the guest is hostile: descriptor chains are bounds-checked before any copy,
//! a malformed chain is consumed with a logged error, and frames passt would refuse (shorter
//! than an Ethernet header, longer than 65535 bytes) are dropped here rather than end the
//! connection. Everything from the socket is bounded too: a length prefix above
//! [`backend::MAX_PREFIX_LEN`] is a protocol error that closes the backend. A backend that
//! hangs up or fails leaves the device running without a network: guest frames are dropped
//! (and counted), one warning is logged.
//!
//! A refused connection must be refused in the guest, not time out: [`handshake`] mends
//! passt's answer to a refused SYN (a RST the guest's TCP would drop) on its way in.
//!
//! The device is split by direction: [`tx`] (guest → passt, checksum completion), [`rx`]
//! (passt → guest, buffer merging), [`device`] (the virtio device, notifications, interrupt
//! suppression), [`persist`] (its snapshot state).

pub mod backend;
pub mod device;
pub mod handshake;
pub mod persist;
pub mod rx;
pub mod tx;

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::FEATURE_VERSION_1;
use backend::PasstStream;
use handshake::Handshakes;
use rx::RxChain;

/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// The MTU the guest is told (VIRTIO_NET_F_MTU): passt's default, the largest it supports.
pub const MTU: u16 = 65520;
/// Length of an Ethernet header: the shortest frame passt accepts.
pub const ETH_HLEN: usize = 14;
/// Longest frame passt accepts from the guest (`L2_MAX_LEN_PASST`); it resets the connection
/// over a longer one, so the device drops such a frame instead.
pub const MAX_TX_FRAME: usize = 65535;
/// Longest frame handed to the guest: the MTU plus the Ethernet header (virtio 1.2, 5.1.6.3).
pub const MAX_RX_FRAME: usize = MTU as usize + ETH_HLEN;
/// `struct virtio_net_hdr_v1`: with VIRTIO_F_VERSION_1 it always has `num_buffers`.
pub const HDR_LEN: usize = 12;
/// The MAC a guest gets unless told otherwise: locally administered, unicast ("fnvm").
pub const DEFAULT_MAC: MacAddr = MacAddr([0x02, 0x66, 0x6e, 0x76, 0x6d, 0x00]);

/// The feature bits offered (see the module documentation for why these).
pub const FEATURES: u64 = FEATURE_VERSION_1
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_MTU
    | 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_NET_F_STATUS;

const TOKEN_BACKEND: u64 = 1;

/// Why the virtio-net device could not be created or restored.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The passt socket could not be connected.
    #[error("cannot connect to the passt socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    /// The connected socket could not be made non-blocking.
    #[error("cannot set up the passt socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    /// The device's own epoll over its socket could not be set up.
    #[error("cannot set up the virtio-net epoll: {0}")]
    Epoll(io::Error),
    /// A saved rx buffer does not lie inside guest memory (a corrupted snapshot).
    #[error("saved rx buffer (descriptor head {head}) is not inside guest memory")]
    SavedBuffer { head: u16 },
}

/// A MAC address, written `xx:xx:xx:xx:xx:xx` (also in snapshots).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

/// A MAC address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (six hex bytes separated by colons, e.g. 02:00:00:00:00:01)")]
pub struct MacParseError(String);

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.chars().take(64).collect());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(mac))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = MacParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(mac: MacAddr) -> String {
        mac.to_string()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What the device counted since it was created (not saved in snapshots).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Guest frames handed to the backend.
    pub tx_frames: u64,
    /// Guest frames dropped: malformed, refused, or no backend.
    pub tx_dropped: u64,
    /// Frames put into the guest's rx buffers.
    pub rx_frames: u64,
    /// Backend frames dropped: too short or too long for the guest, or no room ever.
    pub rx_dropped: u64,
    /// Guest descriptor chains returned unused because they were malformed.
    pub bad_chains: u64,
    /// Refused connections: passt's bare RSTs answering a guest's SYN, sent on as RST+ACK.
    pub refusals: u64,
}

/// The virtio-net device.
pub struct Net {
    mac: MacAddr,
    /// The passt socket this device was connected to (kept in snapshots, for the record).
    socket_path: PathBuf,
    /// `None` once the backend hung up, failed, or broke the protocol.
    backend: Option<PasstStream>,
    /// The device's own epoll over the backend socket (edge-triggered, in and out): the fd the
    /// VMM event loop watches for this device (`VirtioDevice::host_event_fd`), so EPOLLOUT
    /// reaches the device although the loop itself only polls for readability.
    epoll: Epoll,
    /// Rx descriptor chains taken off the queue but not yet filled: a frame waits here until
    /// enough buffers for all of it arrived.
    rx_chains: std::collections::VecDeque<RxChain>,
    /// The guest's SYNs passt has not answered yet, so that its refusals refuse.
    handshakes: Handshakes,
    activated: bool,
    acked_features: u64,
    config: [u8; 12],
    counters: NetCounters,
}

impl Net {
    /// A device with MAC `mac` connected to the passt socket at `path` (which must exist:
    /// passt was started first, e.g. `passt --socket PATH`). The connect itself blocks, as a
    /// Unix connect does only while the listener's backlog is full.
    pub fn connect(path: impl AsRef<Path>, mac: MacAddr) -> Result<Net, NetError> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path).map_err(|source| NetError::Connect {
            path: path.clone(),
            source,
        })?;
        Net::with_stream(stream, path, mac)
    }

    /// A device on an already connected stream (one end of a socketpair in tests, or a socket
    /// handed over by the caller); `path` is only what the device reports and saves.
    pub fn with_stream(stream: UnixStream, path: PathBuf, mac: MacAddr) -> Result<Net, NetError> {
        let backend = PasstStream::new(stream).map_err(|source| NetError::Socket {
            path: path.clone(),
            source,
        })?;
        let epoll = Epoll::new().map_err(NetError::Epoll)?;
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        epoll
            .ctl(
                ControlOperation::Add,
                backend.as_raw_fd(),
                EpollEvent::new(events, TOKEN_BACKEND),
            )
            .map_err(NetError::Epoll)?;
        let mut config = [0u8; 12];
        // struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu (all le16).
        config[0..6].copy_from_slice(&mac.0);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&MTU.to_le_bytes());
        Ok(Net {
            mac,
            socket_path: path,
            backend: Some(backend),
            epoll,
            rx_chains: Default::default(),
            handshakes: Handshakes::default(),
            activated: false,
            acked_features: 0,
            config,
            counters: NetCounters::default(),
        })
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Whether the backend is still there (false after it hung up or broke the protocol).
    pub fn is_connected(&self) -> bool {
        self.backend.is_some()
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Whether the driver accepted VIRTIO_NET_F_MRG_RXBUF.
    fn mergeable(&self) -> bool {
        self.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    /// Drops the backend for good, logging why once: the device goes on without a network.
    fn close_backend(&mut self, reason: &dyn fmt::Display) {
        if let Some(backend) = self.backend.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                backend.as_raw_fd(),
                EpollEvent::default(),
            );
            tracing::warn!(
                path = %self.socket_path.display(),
                %reason,
                "virtio-net: passt backend closed; the guest has no network from now on \
                 (its frames are dropped)"
            );
        }
    }
}

#[cfg(test)]
mod tests;
