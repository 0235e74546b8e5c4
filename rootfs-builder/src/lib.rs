//! The image pipeline: from an image reference to a read-only rootfs image plus its run config.
//!
//! resolve (tag → pinned manifest digest) → fetch and verify blobs into a content-addressed
//! store → unpack layers safely into a tree → build a read-only filesystem image, cached by
//! manifest digest.

pub mod credentials;
pub mod digest;
pub mod layout;
pub mod manifest;
pub mod pipeline;
pub mod reference;
pub mod registry;
pub mod rootfs;
pub mod source;
pub mod store;
pub mod tool;
pub mod unpack;
