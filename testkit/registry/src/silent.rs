//! A registry that accepts connections and never answers: a real TCP listener on 127.0.0.1
//! holding every connection open, silent, for the deadline tests.

use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// Accepts every connection and keeps it open without a byte, until dropped.
pub struct SilentRegistry {
    /// `127.0.0.1:PORT`.
    pub host: String,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl SilentRegistry {
    /// Listens on a free port of loopback.
    pub fn start() -> SilentRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&held);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                keep.lock().unwrap().push(stream);
            }
        });
        SilentRegistry { host, held }
    }

    /// How many connections it holds (what reached it).
    pub fn connections(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}
