//! The image pipeline: from an image reference to a read-only rootfs image plus its run config.
//!
//! resolve (tag → pinned manifest digest) → fetch and verify blobs into a content-addressed
//! store → unpack layers safely into a tree → build a read-only filesystem image, cached by
//! manifest digest.

pub mod digest;
pub mod source;
pub mod credentials;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod store;
pub mod pipeline;
pub mod rootfs;
pub mod unpack;
pub mod layout;
