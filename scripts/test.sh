#!/usr/bin/env bash
# The whole test suite, set-up included: unit tests, device models through guest memory, tiny
# guests under /dev/kvm, the image pipeline against a real registry, Linux guests where the host
# has VMX/SVM (one loud SKIPPED line each elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
FNVM_PROFILE=release scripts/setup.sh tests
export FNVM_AGENT_BIN="${CARGO_TARGET_DIR:-$PWD/target}/x86_64-unknown-linux-gnu/release/fnvm-agent"
exec cargo test --locked --release --workspace "$@"
