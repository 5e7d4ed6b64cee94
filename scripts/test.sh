#!/usr/bin/env bash
# The test command: prepares the machine for the tests (scripts/setup.sh
# --tests), then runs every test, unit and integration, against the real
# Docker engine, Mosquitto and registry. Extra arguments go to
# `cargo nextest run` (a filter, say).
#
# The tests need root (they start engines of their own, mount, chattr). Run
# as root, everything runs as root. Run as a user with sudo, cargo builds as
# that user and only the test binaries run under sudo (nextest's target
# runner), so that no file in target/ becomes root's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh --tests

if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null || {
        echo "test.sh: error: the tests need root, and sudo is not installed: run scripts/test.sh as root" >&2
        exit 1
    }
    host="$(rustc -vV | sed -n 's/^host: //p')"
    runner_var="CARGO_TARGET_$(tr 'a-z-' 'A-Z_' <<<"$host")_RUNNER"
    # sudo's secure_path would replace PATH, and the tests call cargo (cargo
    # deb) on this user's PATH: `env` puts it back, with root's sbin
    # directories (dockerd, mosquitto) after it.
    export "$runner_var=sudo --preserve-env -- env PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin"
    # Ask for a password once, before nextest starts tests side by side.
    sudo -v
fi

exec cargo nextest run --no-fail-fast "$@"
