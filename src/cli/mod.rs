//! One module per command group.

pub mod demo;
pub mod image;
pub mod run;
pub mod vm;
