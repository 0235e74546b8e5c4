//! `fnvm serve`: the host service. The API and its persistent function store, background
//! deploys, the instance pool, invocation, logs, timer triggers and metrics.

pub mod api;
pub mod deploy;
pub mod logs;
pub mod metrics;
pub mod model;
pub mod pool;
pub mod spec_check;
pub mod store;
pub mod timers;
