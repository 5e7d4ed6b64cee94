#!/usr/bin/env bash
# The first command of the README: prepares the machine (scripts/setup.sh),
# builds berth (release) and runs it on the example config
# config/berth.toml and its deployments in config/deployments.d. Extra
# arguments go to `berth run`.
#
# berth needs the Docker engine's socket and writes its state to
# /var/lib/berth-dev. Run as root, it runs as root. Run as a user with sudo,
# cargo builds as that user and berth alone runs under sudo. Ctrl-C stops
# berth and leaves the containers running; the next run adopts them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh
cargo build --release --bin berth
# berth reads only deployment files that no group or other may write (a
# checkout made under umask 002 leaves them group-writable).
chmod go-w config/deployments.d/*.toml

berth=(target/release/berth run --config config/berth.toml "$@")
if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null || {
        echo "run-example.sh: error: berth needs root here, and sudo is not installed: run it as root" >&2
        exit 1
    }
    berth=(sudo -- "${berth[@]}")
fi
exec "${berth[@]}"
