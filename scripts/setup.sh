#!/usr/bin/env bash
# Prepares a Debian/Ubuntu machine to run berth:
#   - the packages: Docker engine, Mosquitto (broker and clients), a
#     registry, busybox-static, curl;
#   - a running Docker engine (systemd when it runs, otherwise dockerd in the
#     background);
#   - the test image berth-test/busybox:1, built from busybox-static;
#   - a registry on 127.0.0.1:5000 holding it as 127.0.0.1:5000/berth/busybox:1;
#   - a Mosquitto broker on 127.0.0.1:1883 for the example run.
# With --tests, also what only the tests and berth-bench need: htpasswd,
# openssl, systemd-analyze, dpkg-dev, docker-compose and GNU time, and, for the user
# who runs cargo, cargo-deb and cargo-nextest (scripts/test.sh passes it).
#
# Run it as root or as a user with sudo: whatever needs root (installing
# packages, starting services, reaching the engine without the docker group)
# makes the script run itself again under sudo, from the start. Cargo tools
# go to the user who runs cargo: under sudo, the user who called it.
# Idempotent: each step checks first and does nothing when its result is
# already there. Prints nothing when there was nothing to do; otherwise one
# line per action. Logs of the background services go to /var/log/berth-dev.
set -euo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

readonly SCRIPT="${BASH_SOURCE[0]}"
readonly ARGS=("$@")
FOR_TESTS=false
for arg in "$@"; do
    case $arg in
        --tests) FOR_TESTS=true ;;
        -h | --help)
            sed -n '2,/^set /s/^# \{0,1\}//p' "$SCRIPT"
            exit 0
            ;;
        *)
            echo "setup.sh: error: unknown argument $arg (use --tests or nothing)" >&2
            exit 2
            ;;
    esac
done
readonly FOR_TESTS

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly LOG_DIR=/var/log/berth-dev
readonly REGISTRY_DATA=/var/lib/berth-registry
readonly REGISTRY_CONFIG="$ROOT/scripts/registry.yml"
readonly REGISTRY_ADDR=127.0.0.1:5000
readonly TEST_IMAGE=berth-test/busybox:1
readonly REGISTRY_REPO=berth/busybox
readonly REGISTRY_TAG=1
readonly REGISTRY_IMAGE="$REGISTRY_ADDR/$REGISTRY_REPO:$REGISTRY_TAG"
readonly MQTT_PORT=1883
readonly ENGINE_TIMEOUT_SECS=60
readonly SERVICE_TIMEOUT_SECS=30

# Temporary paths removed when the script exits, however it exits.
CLEANUP=()
trap 'rm -rf "${CLEANUP[@]}"' EXIT

say() { echo "setup.sh: $*"; }
die() {
    echo "setup.sh: error: $*" >&2
    exit 1
}

# Runs a command with its output kept aside; shows it only if it fails.
quietly() {
    local out
    out="$(mktemp)"
    if ! "$@" >"$out" 2>&1; then
        cat "$out" >&2
        rm -f "$out"
        die "failed: $*"
    fi
    rm -f "$out"
}

# Makes sure the script runs as root from here on: as root it returns;
# otherwise it runs the whole script again under sudo (every step before
# this one only checked, so running it again is harmless).
need_root() {
    [[ $EUID -eq 0 ]] && return
    command -v sudo >/dev/null ||
        die "$1 needs root, and sudo is not installed: run scripts/setup.sh as root"
    say "$1 needs root: running again with sudo"
    # exec skips the EXIT trap.
    rm -rf "${CLEANUP[@]}"
    # The caller's cargo environment, for the cargo tools (sudo resets it).
    exec sudo -- env "SETUP_CALLER_PATH=$PATH" \
        "SETUP_CALLER_CARGO_HOME=${CARGO_HOME:-}" \
        "SETUP_CALLER_RUSTUP_HOME=${RUSTUP_HOME:-}" \
        "$SCRIPT" "${ARGS[@]}"
}

have_systemd() { [[ -d /run/systemd/system ]]; }

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

# The pid of the last service start_detached started; empty under systemd.
STARTED_PID=

# Starts a service detached from this script: its own session, no terminal,
# output to a log file (so that nothing holds this script's stdout open).
start_detached() {
    local log=$1
    shift
    mkdir -p "$LOG_DIR"
    setsid "$@" </dev/null >>"$log" 2>&1 &
    STARTED_PID=$!
}

# wait_for SECONDS WHAT LOG COMMAND...: polls COMMAND until it succeeds; gives
# up at once if the service that start_detached started has exited.
wait_for() {
    local secs=$1 what=$2 log=$3
    shift 3
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [[ -n $STARTED_PID ]] && ! kill -0 "$STARTED_PID" 2>/dev/null; then
            [[ -f $log ]] && tail -n 20 "$log" >&2
            die "$what exited before answering (log: $log)"
        fi
        if ((SECONDS >= deadline)); then
            [[ -f $log ]] && tail -n 20 "$log" >&2
            die "$what did not answer within ${secs}s (log: $log)"
        fi
        sleep 0.2
    done
}

# --- packages ----------------------------------------------------------------

package_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

install_packages() {
    local missing=()
    # The engine may come from docker.io or from Docker's own docker-ce: ask for
    # the daemon, not for a package name, so as not to fight an existing install.
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v mosquitto >/dev/null || missing+=(mosquitto)
    # mosquitto_sub watches the example; the tests publish with mosquitto_pub.
    command -v mosquitto_pub >/dev/null || missing+=(mosquitto-clients)
    command -v docker-registry >/dev/null || missing+=(docker-registry)
    # The test image needs the static build: the dynamic one has no libc to
    # load inside an image that holds nothing else.
    package_installed busybox-static || missing+=(busybox-static)
    # This script asks the registry whether it answers.
    command -v curl >/dev/null || missing+=(curl)
    if $FOR_TESTS; then
        # tests/common's registries with a login.
        command -v htpasswd >/dev/null || missing+=(apache2-utils)
        # tests/mqtt_tls.rs makes its CA and certificates with the openssl CLI.
        command -v openssl >/dev/null || missing+=(openssl)
        # tests/systemd_unit.rs checks the unit with `systemd-analyze verify`,
        # which needs no running systemd.
        command -v systemd-analyze >/dev/null || missing+=(systemd)
        # cargo-deb works out the package's libc dependency with dpkg-shlibdeps.
        command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)
        # berth-bench compares provisioning with it (Debian's, Compose v1).
        command -v docker-compose >/dev/null || missing+=(docker-compose)
        # berth-bench's fleet lane reads `berth fleet`'s peak memory with it.
        [ -x /usr/bin/time ] || missing+=(time)
    fi
    ((${#missing[@]} == 0)) && return
    need_root "installing ${missing[*]}"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    quietly apt-get update -q
    quietly apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# --- cargo tools (--tests) ------------------------------------------------------

# Runs a command as the user who runs cargo, with their cargo: under sudo,
# the user who called sudo, with the environment they ran this script in
# (or, under a sudo typed by hand, that of their login shell).
as_cargo_user() {
    if [[ $EUID -ne 0 || -z ${SUDO_USER:-} || $SUDO_USER == root ]]; then
        bash -c "$1"
    elif [[ -n ${SETUP_CALLER_PATH:-} ]]; then
        local env=("PATH=$SETUP_CALLER_PATH")
        [[ -n ${SETUP_CALLER_CARGO_HOME:-} ]] && env+=("CARGO_HOME=$SETUP_CALLER_CARGO_HOME")
        [[ -n ${SETUP_CALLER_RUSTUP_HOME:-} ]] && env+=("RUSTUP_HOME=$SETUP_CALLER_RUSTUP_HOME")
        sudo -u "$SUDO_USER" -H -- env "${env[@]}" bash -c "$1"
    else
        sudo -u "$SUDO_USER" -H -- bash -lc "$1"
    fi
}

# cargo_tool SUBCOMMAND CRATE: installs CRATE from crates.io unless
# `cargo SUBCOMMAND --version` works already.
cargo_tool() {
    local subcommand=$1 crate=$2
    as_cargo_user "cargo $subcommand --version" >/dev/null 2>&1 && return
    if ! as_cargo_user 'command -v cargo' >/dev/null 2>&1; then
        say "cargo not found, so $crate is not installed; install Rust, then: cargo install --locked $crate"
        return
    fi
    say "installing $crate from crates.io"
    quietly as_cargo_user "cargo install --locked --quiet $crate"
}

install_cargo_tools() {
    # cargo-deb builds the Debian package (`cargo deb`, tests/package.rs);
    # cargo-nextest runs the tests (scripts/test.sh).
    cargo_tool deb cargo-deb
    cargo_tool nextest cargo-nextest
}

# --- Docker engine -----------------------------------------------------------

engine_up() { docker info >/dev/null 2>&1; }

start_engine() {
    engine_up && return
    # A user outside the docker group cannot reach a running engine either:
    # root can, and starts it if it is down.
    need_root "reaching or starting the Docker engine"
    engine_up && return
    if have_systemd; then
        say "starting docker.service"
        STARTED_PID=
        quietly systemctl start docker
    else
        # A dockerd killed without cleaning up leaves its pid file, and the
        # next one refuses to start while it exists.
        local pidfile=/var/run/docker.pid
        if [[ -f $pidfile ]] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            rm -f "$pidfile"
        fi
        say "starting dockerd (log: $LOG_DIR/dockerd.log)"
        start_detached "$LOG_DIR/dockerd.log" dockerd
    fi
    wait_for "$ENGINE_TIMEOUT_SECS" "the Docker engine" "$LOG_DIR/dockerd.log" docker info
}

# The engine's default bridge: a second dockerd told `--bridge none` in the
# host's network namespace deletes `docker0` (the tests and the bench run
# theirs in a namespace of their own, but an older checkout may not have).
# Without it, containers on the default bridge fail to start: a restart of
# the engine makes it again.
restore_default_bridge() {
    [[ -e /sys/class/net/docker0 ]] && return
    docker network inspect bridge >/dev/null 2>&1 || return
    need_root "restoring the engine's docker0 bridge"
    say "docker0 is missing: restarting the Docker engine to make it again"
    if have_systemd; then
        quietly systemctl restart docker
    else
        local pidfile=/var/run/docker.pid pid
        pid="$(cat "$pidfile" 2>/dev/null || true)"
        if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
            local deadline=$((SECONDS + ENGINE_TIMEOUT_SECS))
            while kill -0 "$pid" 2>/dev/null; do
                ((SECONDS < deadline)) || die "dockerd ($pid) did not stop"
                sleep 0.2
            done
        fi
        rm -f "$pidfile"
        start_detached "$LOG_DIR/dockerd.log" dockerd
    fi
    wait_for "$ENGINE_TIMEOUT_SECS" "the Docker engine" "$LOG_DIR/dockerd.log" docker info
    [[ -e /sys/class/net/docker0 ]] || die "the Docker engine came back without docker0"
}

# --- test image --------------------------------------------------------------

busybox_binary() {
    local path
    path="$(dpkg-query -L busybox-static | grep -E '/bin/busybox$' | head -n 1)"
    [[ -x $path ]] || die "busybox-static is installed but its binary was not found"
    echo "$path"
}

build_test_image() {
    docker image inspect "$TEST_IMAGE" >/dev/null 2>&1 && return
    say "building $TEST_IMAGE"
    local busybox rootfs
    busybox="$(busybox_binary)"
    rootfs="$(mktemp -d)"
    CLEANUP+=("$rootfs")
    mkdir -p "$rootfs/bin" "$rootfs/tmp"
    chmod 1777 "$rootfs/tmp"
    cp "$busybox" "$rootfs/bin/busybox"
    local applet
    for applet in $("$busybox" --list); do
        [[ $applet == busybox ]] || ln -s busybox "$rootfs/bin/$applet"
    done
    if [[ ! -e $rootfs/bin/bash ]]; then
        if "$busybox" bash -c 'echo hi' >/dev/null 2>&1; then
            ln -s busybox "$rootfs/bin/bash"
        else
            # Debian's busybox has no bash applet. berth's `run_as_bash` runs
            # `/bin/bash -c "..."`, which busybox's ash understands, so /bin/bash
            # hands everything to it.
            cat >"$rootfs/bin/bash" <<'SHIM'
#!/bin/sh
# busybox has no bash applet; its ash understands what `bash -c` is given.
exec /bin/sh "$@"
SHIM
            chmod 755 "$rootfs/bin/bash"
        fi
    fi
    tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -c . |
        quietly docker import \
            --change 'ENV PATH=/bin' \
            --change 'CMD ["sh"]' \
            - "$TEST_IMAGE"
}

# --- registry on 127.0.0.1:5000 ----------------------------------------------

registry_status() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$REGISTRY_ADDR/v2/" || true
}

registry_up() { [[ "$(registry_status)" == 200 ]]; }

start_registry() {
    registry_up && return
    if port_open 127.0.0.1 5000; then
        # Debian's docker-registry package starts its own service, with auth
        # on, on port 5000 under systemd. This one replaces it.
        if have_systemd && systemctl is-active --quiet docker-registry 2>/dev/null; then
            need_root "replacing the packaged docker-registry service"
            say "stopping and disabling the packaged docker-registry.service (port 5000)"
            quietly systemctl disable --now docker-registry
        else
            die "127.0.0.1:5000 is taken by something that is not an open registry (GET /v2/ gave $(registry_status)); free the port"
        fi
    fi
    need_root "starting the registry"
    mkdir -p "$REGISTRY_DATA"
    say "starting the registry on $REGISTRY_ADDR (log: $LOG_DIR/registry.log)"
    start_detached "$LOG_DIR/registry.log" docker-registry serve "$REGISTRY_CONFIG"
    wait_for "$SERVICE_TIMEOUT_SECS" "the registry on $REGISTRY_ADDR" "$LOG_DIR/registry.log" registry_up
}

# The image id (the digest of its config) of the registry's copy, if any.
registry_image_id() {
    curl -sf --max-time 5 \
        -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
        "http://$REGISTRY_ADDR/v2/$REGISTRY_REPO/manifests/$REGISTRY_TAG" |
        tr -d ' \n' | grep -o '"config":{[^}]*}' | grep -o 'sha256:[0-9a-f]*' || true
}

# Pushes the test image unless the registry already holds that very image
# (it differs after the local one was rebuilt).
push_registry_image() {
    local local_id
    local_id="$(docker image inspect --format '{{.Id}}' "$TEST_IMAGE")"
    [[ "$(registry_image_id)" == "$local_id" ]] && return
    say "pushing $REGISTRY_IMAGE"
    quietly docker tag "$TEST_IMAGE" "$REGISTRY_IMAGE"
    local out
    if ! out="$(docker push "$REGISTRY_IMAGE" 2>&1)"; then
        echo "$out" >&2
        if grep -q 'HTTP response to HTTPS client' <<<"$out"; then
            die "the engine wants HTTPS for $REGISTRY_ADDR: add it to \"insecure-registries\" in /etc/docker/daemon.json"
        fi
        die "could not push $REGISTRY_IMAGE"
    fi
}

# --- MQTT broker on 127.0.0.1:1883 -------------------------------------------

start_broker() {
    port_open 127.0.0.1 "$MQTT_PORT" && return
    if have_systemd && systemctl list-unit-files mosquitto.service >/dev/null 2>&1; then
        need_root "starting mosquitto"
        say "starting mosquitto.service"
        STARTED_PID=
        quietly systemctl start mosquitto
    else
        need_root "starting mosquitto"
        say "starting mosquitto on 127.0.0.1:$MQTT_PORT (log: $LOG_DIR/mosquitto.log)"
        # Without a config file, mosquitto 2 listens on loopback only and
        # allows anonymous clients: what a development broker should do.
        start_detached "$LOG_DIR/mosquitto.log" mosquitto -p "$MQTT_PORT"
    fi
    wait_for "$SERVICE_TIMEOUT_SECS" "mosquitto on 127.0.0.1:$MQTT_PORT" "$LOG_DIR/mosquitto.log" \
        port_open 127.0.0.1 "$MQTT_PORT"
}

install_packages
start_engine
restore_default_bridge
build_test_image
start_registry
push_registry_image
start_broker
# Last: every step that may run the script again under sudo is done.
if $FOR_TESTS; then
    install_cargo_tools
fi
