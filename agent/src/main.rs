//! fnvm-agent: the guest's PID 1.
fn main() {
    println!("fnvm-agent: not built yet");
}
