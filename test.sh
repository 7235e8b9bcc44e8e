#!/usr/bin/env bash
# Runs every test: unit tests, and integration tests on real files, loop devices and a
# throwaway sshd on a loopback port. Needs root (losetup, mount, test users).
set -euo pipefail
cd "$(dirname "$0")"
cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release "$@"
# The Debian package: built (cargo-deb), then installed and checked, then removed.
./pkg/deb.sh
./pkg/check-deb.sh
