//! The registry fixture of the image pipeline's tests and of `fnvm serve`'s: a real
//! `docker-registry` (distribution 2.8) on 127.0.0.1, images built by the test itself (tar +
//! gzip layers, OCI manifests and indexes), a small pusher speaking the distribution API, a
//! token server, a loopback TCP proxy that can cut connections mid-stream and a tiny HTTP server.
//!
//! A crate of its own, apart from `fnvm-testkit`: rootfs-builder's tests use it, and they must
//! not depend on fnvm (which depends on rootfs-builder). It uses rootfs-builder's own
//! [`Digest`](fnvm_rootfs_builder::digest::Digest), so tests compare digests as the pipeline
//! reports them; only integration tests use it, so they link the one rootfs-builder library.

mod files;
mod image;
mod proxy;
mod server;
mod silent;
mod tiny_http;
mod token;

pub use files::{extract_rootfs_image, temp_files, tree_listing};
pub use image::*;
pub use proxy::CuttingProxy;
pub use server::{free_port, Registry, RegistryConfig, Tls};
pub use silent::SilentRegistry;
pub use tiny_http::{Reply, SeenRequest, TinyHttp};
pub use token::{TokenServer, TOKEN_ISSUER, TOKEN_SERVICE};

/// The media type of an OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The media type of an OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// The media type of a gzip-compressed OCI layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The user of an htpasswd- or token-auth registry.
pub const USER: &str = "alice";
/// The password of [`USER`]; tests check it never shows in what fnvm prints or stores.
pub const PASSWORD: &str = "s3cret-pass";
