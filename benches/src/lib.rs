//! Shared helpers for fnvm's benchmarks: each benchmark is a binary in `src/bin/` that prints a
//! table of medians and ratios against a peer measured in the same run.
