//! The service's logs: every stdout/stderr line of every instance, stored per function
//! ([`store`]) with the request id of the invocation it was printed during ([`attribution`]).

mod attribution;
mod store;

pub use attribution::Attribution;
pub use store::{LogCursor, LogEntry, LogQuery, LogStore};
