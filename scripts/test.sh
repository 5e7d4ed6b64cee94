#!/usr/bin/env bash
# The test command: prepares the machine (scripts/setup.sh), then runs every
# test, unit and integration, against the real Docker engine, Mosquitto and
# registry. Extra arguments go to `cargo nextest run` (a filter, say).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "test.sh: cargo-nextest is missing; installing it from crates.io" >&2
    cargo install --locked --quiet cargo-nextest
fi

exec cargo nextest run --no-fail-fast "$@"
