#!/usr/bin/env bash
# The main job, set-up included: builds fnvm and runs `fnvm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
FNVM_PROFILE=release scripts/setup.sh demo
cargo build --quiet --locked --release -p fnvm -p fnvm-vmm
export FNVM_AGENT_BIN="${CARGO_TARGET_DIR:-$PWD/target}/x86_64-unknown-linux-gnu/release/fnvm-agent"
exec "${CARGO_TARGET_DIR:-$PWD/target}/release/fnvm" demo "$@"
