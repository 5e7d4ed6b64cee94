//! The `berth` binary: flags, logging, config, the real adapters, and the
//! mapping from errors to exit codes. Everything else lives in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use berth::config::{self, AgentConfig};
use berth::control::{self, Snapshot};
use berth::fleet::{self, BrokerOptions, CommandRequest};
use berth::notify::Notifier;
use berth::remote::{self, CommandName};
use berth::report::mqtt::MqttReporter;
use berth::report::offline_doc;
use berth::runtime::docker::{DockerRuntime, LogRequest};
use berth::runtime::RegistryAuth;
use berth::state::StateStore;
use berth::supervisor::{Action, Parts, Supervisor};

/// Exit code for a configuration berth cannot start with (EX_CONFIG); the
/// systemd unit does not restart on it.
const EXIT_BAD_CONFIG: u8 = 78;
/// Exit code of `berth status` when no daemon answers on the control socket.
const EXIT_NOT_RUNNING: u8 = 3;
/// Exit code of `berth exec` when berth itself fails, as `docker exec` does.
const EXIT_EXEC_FAILED: u8 = 125;
/// Exit code of `berth fleet <command>` when no reply came.
const EXIT_NO_REPLY: u8 = 2;

/// Runs robot deployments as supervised Docker containers, reports over MQTT
///
/// berth runs the deployments of this robot (one TOML file each) as Docker
/// containers, enforces their restart policies, counts restarts, and
/// publishes the state of every deployment over MQTT. `berth run` is the
/// daemon that the systemd unit starts; the other commands are for an
/// operator on the robot.
///
/// Every command reads the agent config: `--config FILE`, else
/// `$BERTH_CONFIG`, else /etc/berth/berth.toml. It names the deployments
/// directory (one `*.toml` file per deployment), the state directory (where
/// the daemon's control socket is), the Docker engine and the MQTT broker;
/// relative paths in it are resolved against the config file's directory.
#[derive(Parser)]
#[command(
    version,
    after_help = "Each command's --help gives its exit status, e.g. `berth run --help`.
Every config key and MQTT topic: /usr/share/doc/berth/README.md"
)]
struct Cli {
    /// The agent config file
    ///
    /// Relative paths inside it are resolved against its directory.
    #[arg(
        long,
        short,
        env = "BERTH_CONFIG",
        default_value = "/etc/berth/berth.toml",
        global = true
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: start, supervise and report every deployment
    ///
    /// Reads the agent config, then every `*.toml` file of its
    /// `deployments_dir`; connects to the Docker engine (`[docker] host`) and
    /// the MQTT broker (`[mqtt] url`); adopts the containers it already runs
    /// (label `berth.device=<device_id>`) without restarting them; and
    /// converges to the files. It stays in the foreground and logs to
    /// standard error (`[log]`; `RUST_LOG` overrides the level). An engine
    /// or broker that is away is retried, never fatal.
    ///
    /// The agent config must be valid to start; an invalid deployment file
    /// affects its own deployment only (`FailedToStart`). Under systemd
    /// (`NOTIFY_SOCKET`) berth reports readiness, a one-line status and
    /// watchdog pings.
    #[command(after_help = "Signals:
  SIGHUP           re-read the agent config and every deployment file, and
                   converge (`systemctl reload berth`); an invalid agent config
                   is logged and the running one stays. Changes in
                   deployments_dir are also picked up without it.
  SIGTERM, SIGINT  stop berth; every container keeps running, and the next
                   start adopts it

Exit status:
  0   stopped by SIGTERM or SIGINT
  78  the agent config cannot be used at start-up: it is invalid (`berth
      check-config` says why), or a file it names cannot be read (boot_id_file,
      a password_file, ca_file, cert_file, key_file); systemd does not restart
      berth on it
  1   any other failure, such as a state_dir that cannot be created")]
    Run {
        /// Append a line per restart step (die received, start request sent)
        /// to this file, for `berth-bench`; see src/trace.rs.
        #[arg(long, value_name = "PATH", hide = true)]
        trace_file: Option<PathBuf>,
    },
    /// Validate the agent config and every deployment file
    ///
    /// Reads the agent config and every `*.toml` file of its `deployments_dir`
    /// as `berth run` does, and checks the dependencies between deployments
    /// (unknown ids, cycles). Needs neither the daemon, the engine nor the
    /// broker, and changes nothing: run it after an edit, before `systemctl
    /// reload berth`.
    ///
    /// Prints each error on standard output as `file:line:col: message`, or
    /// `<config>: ok` when there is none. It does not open the files the
    /// config names (passwords, certificates, boot_id_file) nor match the TLS
    /// files against the url (they need `mqtts://`): `berth run` does that at
    /// start-up and exits 78 on a problem.
    #[command(after_help = "Exit status:
  0  every file is valid
  1  at least one error, each printed; or the agent config cannot be read")]
    CheckConfig,
    /// Show every deployment and its executables, as the running daemon sees
    /// them
    ///
    /// Asks the daemon on its control socket (`<state_dir>/berth.sock`, read
    /// from the agent config) and prints one row per deployment: phase,
    /// status, restart count, error code and reason, with each executable
    /// (component/name) indented below it. The first line tells whether the
    /// Docker engine answers; the last one shows the shared ROS master, if
    /// any. Colours only when stdout is a terminal. The socket is only
    /// open to the user berth runs as (root).
    #[command(after_help = "Exit status:
  0  shown
  1  failed: the agent config is unreadable or invalid, no permission to use
     the socket, or the daemon did not answer with a status
  3  berth is not running: no daemon answers on the control socket")]
    Status {
        /// Print the documents exactly as MQTT carries them:
        /// `{"agent": …, "deployments": [ … ], "ros_master": …}`.
        #[arg(long)]
        json: bool,
        /// Add CPU (percent of one core), memory (of its limit) and health
        /// columns for each executable, from the latest `metrics` document.
        #[arg(long)]
        wide: bool,
    },
    /// Print the output of an executable's container
    ///
    /// The container's stdout goes to stdout and its stderr to stderr. Works
    /// without the daemon, and for a container that has stopped: berth finds
    /// the container by its labels on the Docker engine of the agent config.
    /// The shared ROS master is `berth logs _ros`.
    #[command(after_help = "Exit status:
  0  done
  1  no such deployment or executable (or several, and none named), the agent
     config is unreadable or invalid, or the Docker engine failed")]
    Logs {
        /// The deployment's id.
        deployment: String,
        /// `NAME` or `COMPONENT/NAME`; optional when the deployment has one
        /// executable only.
        executable: Option<String>,
        /// Keep printing new output until the container stops (or Ctrl-C).
        #[arg(long, short)]
        follow: bool,
        /// Only the last N lines of the log (default: all of it).
        #[arg(long, short = 'n', value_name = "N")]
        tail: Option<u64>,
        /// Prefix every line with the engine's time stamp.
        #[arg(long, short)]
        timestamps: bool,
    },
    /// Run a command inside an executable's running container, for debugging
    ///
    /// With stdin on a terminal the command gets a terminal of its own (try
    /// `berth exec DEPLOYMENT EXECUTABLE -- sh`); keys, Ctrl-C included, go to
    /// the command. Otherwise stdin, stdout and stderr are plain pipes. Works
    /// without the daemon, like `berth logs`.
    #[command(after_help = "Exit status:
  N        the command's own exit code; 126 or 127 when the engine could not
           run it (for example a command not in the container's $PATH)
  129/143  berth got SIGHUP/SIGTERM and ended the session
  125      berth could not run it: no such deployment or executable, the
           container is not running, the agent config is unreadable or
           invalid, or the Docker engine failed")]
    Exec {
        /// The deployment's id.
        deployment: String,
        /// `NAME` or `COMPONENT/NAME`.
        executable: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Restart a deployment's executables now (counted), through the daemon
    ///
    /// Stops the container(s) (SIGTERM, grace period, SIGKILL) and starts
    /// them again at once; each restart counts, and its `restart` event says
    /// `"by": "berth restart (local)"`. Prints the deployment afterwards.
    #[command(after_help = ACTION_EXIT)]
    Restart(ActionArgs),
    /// Stop a deployment's executables until `berth start` or a reboot
    ///
    /// The manual-stop row of the restart rules: berth stops the
    /// container(s) on your behalf, they show `Stopped` ("stopped manually;
    /// restart policy suspended until reboot") and are not restarted, under
    /// any policy, until `berth start` or the next boot.
    #[command(after_help = ACTION_EXIT)]
    Stop(ActionArgs),
    /// Start a deployment's stopped executables again; the policy applies again
    ///
    /// A start by hand: not counted as a restart.
    #[command(after_help = ACTION_EXIT)]
    Start(ActionArgs),
    /// The fleet: every device and deployment on a broker, and signed commands
    ///
    /// Without a subcommand, reads the retained `agent` and `deployments`
    /// documents of every device under `--prefix` on `--broker` and prints
    /// one table: devices (online or offline, since when), then
    /// deployments, those in Error first. Needs neither a daemon nor an
    /// agent config.
    #[command(after_help = "Exit status:
  0  shown, or the command was carried out (reply ok)
  1  the broker cannot be reached, or the command was refused or failed
  2  no reply to the command in time")]
    Fleet(FleetArgs),
}

const ACTION_EXIT: &str = "Exit status:
  0  done; the deployment is printed as it is afterwards
  1  refused (no such deployment or executable, engine unreachable), or the
     agent config is unreadable or invalid
  3  berth is not running: no daemon answers on the control socket";

#[derive(Args)]
struct ActionArgs {
    /// The deployment's id.
    deployment: String,
    /// `NAME` or `COMPONENT/NAME`; every executable of the deployment when
    /// left out.
    executable: Option<String>,
}

#[derive(Args)]
struct FleetArgs {
    /// The broker: mqtt://host[:port] or mqtts://host[:port].
    #[arg(long, global = true, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// The topic prefix of the devices (their `[mqtt] topic_prefix`).
    #[arg(long, global = true, default_value = "berth")]
    prefix: String,
    /// Broker login.
    #[arg(long, global = true)]
    username: Option<String>,
    /// A file holding the password of --username.
    #[arg(long, global = true)]
    password_file: Option<PathBuf>,
    /// For mqtts://: the CA of the broker's certificate.
    #[arg(long, global = true)]
    ca_file: Option<PathBuf>,
    /// Keep the table current, redrawing it on every change.
    #[arg(long)]
    watch: bool,
    /// Print the documents: {"devices": [{"device_id", "agent", "deployments"}]}.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Option<FleetCommand>,
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Write a deployment file on a device (validated there first)
    Apply {
        #[command(flatten)]
        signed: Signed,
        /// The deployment file (TOML) to send.
        file: PathBuf,
    },
    /// Delete a deployment's file on a device: it is deprovisioned
    Remove {
        #[command(flatten)]
        signed: Signed,
        /// The deployment's id.
        deployment: String,
    },
    /// Restart a deployment, or one executable, on a device (counted)
    Restart {
        #[command(flatten)]
        signed: Signed,
        /// `DEPLOYMENT` or `DEPLOYMENT/COMPONENT/EXECUTABLE`.
        target: String,
    },
    /// Stop a deployment, or one executable, until start or a reboot
    Stop {
        #[command(flatten)]
        signed: Signed,
        /// `DEPLOYMENT` or `DEPLOYMENT/COMPONENT/EXECUTABLE`.
        target: String,
    },
    /// Start a stopped deployment, or one executable, again
    Start {
        #[command(flatten)]
        signed: Signed,
        /// `DEPLOYMENT` or `DEPLOYMENT/COMPONENT/EXECUTABLE`.
        target: String,
    },
    /// Write a new ed25519 key pair: KEY_ID.key (private, 0600) and KEY_ID.pem
    ///
    /// Copy KEY_ID.pem into the `trusted_keys_dir` of each device; sign with
    /// `--key KEY_ID.key`. The same formats as `openssl genpkey -algorithm
    /// ed25519` and `openssl pkey -pubout`.
    Keygen {
        /// The key's name: devices look for `<trusted_keys_dir>/KEY_ID.pem`.
        key_id: String,
        /// Where to write the two files.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Args)]
struct Signed {
    /// The device's id.
    #[arg(long)]
    device: String,
    /// The operator's private key (PEM PRIVATE KEY, ed25519).
    #[arg(long, env = "BERTH_FLEET_KEY")]
    key: PathBuf,
    /// The key's name on the devices (default: the key file's name without
    /// its extension).
    #[arg(long)]
    key_id: Option<String>,
    /// How long the device may take (an apply waits until the deployment
    /// is Succeeded, FailedToStart or FailedToUpdate).
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    timeout: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig => check_config(&cli.config),
        Command::Status { json, wide } => status(&cli.config, json, wide),
        Command::Logs {
            deployment,
            executable,
            follow,
            tail,
            timestamps,
        } => {
            let request = LogRequest {
                follow,
                tail,
                timestamps,
            };
            logs(&cli.config, &deployment, executable.as_deref(), request)
        }
        Command::Exec {
            deployment,
            executable,
            command,
        } => exec(&cli.config, &deployment, &executable, command),
        Command::Restart(args) => action(&cli.config, Action::Restart, args),
        Command::Stop(args) => action(&cli.config, Action::Stop, args),
        Command::Start(args) => action(&cli.config, Action::Start, args),
        Command::Fleet(args) => fleet(args),
        Command::Run { trace_file } => {
            if let Some(path) = &trace_file {
                if let Err(e) = berth::trace::enable(path) {
                    eprintln!("berth: cannot open the trace file {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            let config = match config::load_agent(&cli.config) {
                Ok(config) => config,
                Err(errors) => {
                    for e in errors {
                        eprintln!("{e}");
                    }
                    eprintln!("berth: the agent config is invalid; fix it and start berth again");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            init_tracing(&config);
            // One thread: berth's work is a loop of short reactions, and every
            // further worker thread costs resident memory (its stack and its
            // own malloc arena) on a device where memory is scarce.
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("berth: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(run(config));
            // A blocking task still stuck in a file or a disk (the reading of
            // a deployment file, a state write) must not hold the exit.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(RunError::Config(e)) => {
                    error!("{e:#}");
                    ExitCode::from(EXIT_BAD_CONFIG)
                }
                Err(RunError::Other(e)) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check_config(path: &Path) -> ExitCode {
    let errors = config::check_all(path);
    for e in &errors {
        println!("{e}");
    }
    if errors.is_empty() {
        println!("{}: ok", path.display());
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The agent config of an operator command; its errors are printed.
fn load_for_tool(path: &Path) -> Option<AgentConfig> {
    match config::load_agent(path) {
        Ok(config) => Some(config),
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            None
        }
    }
}

fn status(config_path: &Path, json: bool, wide: bool) -> ExitCode {
    use std::io::IsTerminal;
    let Some(config) = load_for_tool(config_path) else {
        return ExitCode::FAILURE;
    };
    match control::query_status(&control::socket_path(&config.state_dir)) {
        Ok(answer) if json => println!(
            "{}",
            serde_json::to_string(&answer).expect("documents serialize")
        ),
        Ok(answer) => {
            let colour = std::io::stdout().is_terminal();
            if wide {
                print!("{}", control::render_status_wide(&answer, colour));
            } else {
                print!("{}", control::render_status(&answer, colour));
            }
        }
        Err(e @ control::QueryError::NotRunning { .. }) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_NOT_RUNNING);
        }
        Err(e) => {
            eprintln!("berth: {:#}", anyhow::Error::from(e));
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn action(config_path: &Path, action: Action, args: ActionArgs) -> ExitCode {
    use std::io::IsTerminal;
    let Some(config) = load_for_tool(config_path) else {
        return ExitCode::FAILURE;
    };
    let socket = control::socket_path(&config.state_dir);
    match control::query_action(
        &socket,
        action,
        &args.deployment,
        args.executable.as_deref(),
    ) {
        Ok(doc) => {
            let colour = std::io::stdout().is_terminal();
            print!("{}", control::render_deployment(&doc, colour));
            ExitCode::SUCCESS
        }
        Err(e @ control::QueryError::NotRunning { .. }) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_NOT_RUNNING)
        }
        Err(e) => {
            eprintln!("berth: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}

fn fleet(args: FleetArgs) -> ExitCode {
    let broker = BrokerOptions {
        url: args.broker.clone(),
        username: args.username.clone(),
        password_file: args.password_file.clone(),
        ca_file: args.ca_file.clone(),
    };
    let rt = match tool_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let (command, signed, payload) = match args.command {
        None => return rt.block_on(fleet_view(&broker, &args.prefix, args.watch, args.json)),
        Some(FleetCommand::Keygen { key_id, dir }) => {
            if !remote::valid_key_id(&key_id) {
                eprintln!("berth: invalid key id {key_id:?}: use 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'");
                return ExitCode::FAILURE;
            }
            return match remote::keys::keygen(&dir, &key_id) {
                Ok((private, public)) => {
                    println!("private key: {}", private.display());
                    println!(
                        "public key:  {} (copy it into each device's trusted_keys_dir)",
                        public.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("berth: {:#}", anyhow::Error::from(e));
                    ExitCode::FAILURE
                }
            };
        }
        Some(FleetCommand::Apply { signed, file }) => match std::fs::read_to_string(&file) {
            Ok(text) => (CommandName::Apply, signed, text),
            Err(e) => {
                eprintln!("berth: cannot read {}: {e}", file.display());
                return ExitCode::FAILURE;
            }
        },
        Some(FleetCommand::Remove { signed, deployment }) => {
            (CommandName::Remove, signed, deployment)
        }
        Some(FleetCommand::Restart { signed, target }) => (CommandName::Restart, signed, target),
        Some(FleetCommand::Stop { signed, target }) => (CommandName::Stop, signed, target),
        Some(FleetCommand::Start { signed, target }) => (CommandName::Start, signed, target),
    };
    let key_id = signed.key_id.clone().unwrap_or_else(|| {
        signed
            .key
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let request = CommandRequest {
        device: signed.device,
        prefix: args.prefix,
        command,
        payload,
        key_file: signed.key,
        key_id,
        timeout: std::time::Duration::from_secs(signed.timeout),
    };
    match rt.block_on(fleet::send_command(&broker, &request)) {
        Ok(Some(reply)) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&reply).expect("replies serialize")
            );
            if reply.ok {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "berth: {} {} on {}: {}",
                    command,
                    if reply.deployment.is_some() {
                        "failed"
                    } else {
                        "refused"
                    },
                    request.device,
                    reply.error.as_deref().unwrap_or("no reason given")
                );
                ExitCode::FAILURE
            }
        }
        Ok(None) => {
            eprintln!(
                "berth: no reply from {} within {} s (is it online, with [remote] enabled?)",
                request.device,
                request.timeout.as_secs() + 10
            );
            ExitCode::from(EXIT_NO_REPLY)
        }
        Err(e) => {
            eprintln!("berth: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}

async fn fleet_view(broker: &BrokerOptions, prefix: &str, watch: bool, json: bool) -> ExitCode {
    let result = if watch {
        fleet::watch(broker, prefix, |view| {
            if json {
                println!("{}", fleet::to_json(view));
            } else {
                // Clear the screen, then draw from the top.
                print!("\x1b[H\x1b[2J{}", fleet::render(view));
            }
            use std::io::Write;
            std::io::stdout().flush().is_ok()
        })
        .await
    } else {
        fleet::collect(broker, prefix).await.map(|view| {
            if json {
                println!("{}", fleet::to_json(&view));
            } else {
                print!("{}", fleet::render(&view));
            }
        })
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}

fn logs(
    config_path: &Path,
    deployment: &str,
    executable: Option<&str>,
    request: LogRequest,
) -> ExitCode {
    let Some(config) = load_for_tool(config_path) else {
        return ExitCode::FAILURE;
    };
    let result = tool_runtime().and_then(|rt| {
        rt.block_on(async {
            let engine = DockerRuntime::from_settings(&config.docker, &config.containers);
            let container =
                control::find_container(&engine, &config.device_id, deployment, executable).await?;
            control::logs(&engine, &container, request).await?;
            Ok(())
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn exec(config_path: &Path, deployment: &str, executable: &str, command: Vec<String>) -> ExitCode {
    let Some(config) = load_for_tool(config_path) else {
        return ExitCode::from(EXIT_EXEC_FAILED);
    };
    let result = tool_runtime().and_then(|rt| {
        rt.block_on(async {
            let engine = DockerRuntime::from_settings(&config.docker, &config.containers);
            let container =
                control::find_container(&engine, &config.device_id, deployment, Some(executable))
                    .await?;
            Ok(control::exec(&engine, &container, command).await?)
        })
    });
    match result {
        // Exit codes are 0..=255; wrap like the shell does.
        Ok(code) => ExitCode::from((code & 0xff) as u8),
        Err(e) => {
            eprintln!("berth: {e:#}");
            ExitCode::from(EXIT_EXEC_FAILED)
        }
    }
}

/// A small runtime for the operator commands that talk to the engine.
fn tool_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `[log] level` for berth's own lines; `RUST_LOG` (`berth=debug`,
/// `info,berth=trace`, ...) overrides it. `Targets` rather than `EnvFilter`:
/// the same syntax without span filters, and without a regex engine in a
/// binary that must stay small.
fn init_tracing(config: &AgentConfig) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let default = || {
        format!("berth={}", config.log.level)
            .parse::<Targets>()
            .expect("validated level")
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => spec.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("berth: ignoring RUST_LOG={spec:?}: {e}");
            default()
        }),
        _ => default(),
    };
    // Logs go to stderr (the journal under systemd), coloured only on a terminal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter);
    if config.log.json {
        registry.with(layer.json()).init();
    } else {
        registry.with(layer).init();
    }
}

enum RunError {
    Config(anyhow::Error),
    Other(anyhow::Error),
}

async fn run(config: AgentConfig) -> Result<(), RunError> {
    let registries = read_registries(&config).map_err(RunError::Config)?;
    let boot_id = std::fs::read_to_string(&config.boot_id_file)
        .with_context(|| format!("cannot read boot_id_file {}", config.boot_id_file.display()))
        .map_err(RunError::Config)?
        .trim()
        .to_string();
    let store = StateStore::open(&config.state_dir)
        .context("cannot open state_dir")
        .map_err(RunError::Other)?;
    // An unreadable state file falls back to its previous copy and the
    // restart log; the problem is reported (DEP_E302) once the loop runs.
    let recovered = store
        .recover()
        .context("cannot use the state")
        .map_err(RunError::Other)?;
    // The watch is set before the first reading, so that a file written
    // in between is a change that reloads, not one that waits for the next.
    let watch = berth::watch::Watch::set(&config.deployments_dir);
    let (deployments, invalid) = berth::supervisor::load_files(&config.deployments_dir);

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    // Remote commands (SPEC 10): the reporter subscribes and hands them over.
    let (commands_tx, commands_rx) = match config.remote.enabled {
        true => {
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let reporter = MqttReporter::start_with_commands(
        &config.mqtt,
        &config.device_id,
        offline_doc(),
        commands_tx,
        shutdown.child_token(),
        &tracker,
    )
    .context("cannot set up MQTT")
    .map_err(RunError::Config)?;
    let mqtt = Arc::new(reporter);
    let reporter = Arc::new(Snapshot::new(mqtt.clone()));
    let runtime = Arc::new(DockerRuntime::from_settings(
        &config.docker,
        &config.containers,
    ));

    spawn_signal_handler(shutdown.clone());
    let deployments_dir = config.deployments_dir.clone();
    let state_dir = config.state_dir.clone();
    let device_id = config.device_id.clone();
    let remote_settings = config.remote.clone();
    let mut supervisor = Supervisor::from_parts(Parts {
        config,
        deployments,
        runtime,
        reporter: reporter.clone(),
        store,
        state: recovered.state,
        boot_id,
        registries,
        notifier: Notifier::from_env(),
        invalid,
    });
    supervisor.report_state_problems(recovered.problems);
    // The daemon runs without it: only `berth status` and the operator
    // actions depend on it.
    if let Err(e) = control::serve_with_operator(
        &state_dir,
        reporter.clone(),
        Some(supervisor.operator()),
        shutdown.child_token(),
        &tracker,
    ) {
        error!(
            "{:#}; `berth status` will not answer",
            anyhow::Error::from(e)
        );
    }
    if let Some(commands) = commands_rx {
        if !remote_settings.trusted_keys_dir.is_dir() {
            warn!(dir = %remote_settings.trusted_keys_dir.display(), "remote commands enabled but trusted_keys_dir is missing: every command will be refused");
        }
        info!(trusted_keys_dir = %remote_settings.trusted_keys_dir.display(), "remote commands enabled");
        let replies = mqtt.clone();
        let service = remote::service::Service {
            verifier: remote::Verifier::new(
                &device_id,
                &remote_settings.trusted_keys_dir,
                remote::SeenRequests::open(&state_dir),
            ),
            device_id,
            deployments_dir: deployments_dir.clone(),
            remote: remote_settings,
            operator: supervisor.operator(),
            snapshot: reporter.clone(),
            replies: Arc::new(move |id: &str, reply| replies.reply(id, reply)),
        };
        tracker.spawn(service.run(commands, shutdown.child_token(), tracker.clone()));
    }
    if let Some(watch) = watch {
        watch.spawn(supervisor.reloader(), shutdown.clone(), &tracker);
    }
    spawn_reload_on_sighup(supervisor.reloader(), shutdown.clone());
    supervisor.run(shutdown.clone()).await;
    mqtt.shutdown().await;
    tracker.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), tracker.wait()).await;
    info!("berth stopped");
    Ok(())
}

fn read_registries(config: &AgentConfig) -> anyhow::Result<Vec<RegistryAuth>> {
    config
        .docker
        .registries
        .iter()
        .map(|r| {
            let password = std::fs::read_to_string(&r.password_file).with_context(|| {
                format!(
                    "cannot read the password_file of registry {}: {}",
                    r.server,
                    r.password_file.display()
                )
            })?;
            Ok(RegistryAuth {
                server: r.server.clone(),
                username: r.username.clone(),
                password: password.trim_end_matches(['\n', '\r']).to_string(),
            })
        })
        .collect()
}

/// SIGHUP (`systemctl reload`) re-reads the config and the deployment files.
fn spawn_reload_on_sighup(reloader: berth::supervisor::Reloader, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            error!("cannot install the SIGHUP handler");
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(()) = hup.recv() => {
                    info!("SIGHUP received; reloading");
                    reloader.reload();
                }
            }
        }
    });
}

/// SIGTERM (what systemd sends) and SIGINT cancel; containers keep running.
fn spawn_signal_handler(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
        shutdown.cancel();
    });
}
