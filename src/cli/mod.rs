//! One module per command group.

pub mod bench;
pub mod client;
pub mod demo;
pub mod image;
pub mod run;
pub mod serve;
pub mod vm;
