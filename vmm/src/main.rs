//! `fnvm-vmm`: the per-instance VMM process.
fn main() {
    eprintln!("fnvm-vmm: not built yet");
    std::process::exit(2);
}
