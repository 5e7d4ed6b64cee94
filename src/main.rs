//! The `berth` binary: flags, logging, config, the real adapters, and the
//! mapping from errors to exit codes. Everything else lives in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use berth::config::{self, AgentConfig};
use berth::report::mqtt::MqttReporter;
use berth::report::offline_doc;
use berth::notify::Notifier;
use berth::runtime::docker::DockerRuntime;
use berth::runtime::RegistryAuth;
use berth::state::StateStore;
use berth::supervisor::{Parts, Supervisor};

/// Exit code for a configuration berth cannot start with (EX_CONFIG); the
/// systemd unit does not restart on it.
const EXIT_BAD_CONFIG: u8 = 78;

/// berth runs the deployments of this robot as supervised Docker containers
/// and reports their state over MQTT.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// The agent config file.
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
    /// Run the daemon: start, supervise and report every deployment.
    Run,
    /// Check the agent config and every deployment file; print each error as
    /// `file:line:col: message` and exit 1 if there is any.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig => check_config(&cli.config),
        Command::Run => {
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
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("berth: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(config)) {
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

fn init_tracing(config: &AgentConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("berth={}", config.log.level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if config.log.json {
        builder.json().init();
    } else {
        builder.init();
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
    let state = match store.load() {
        Ok(state) => state,
        Err(e) => {
            // DEP_E302: keep the evidence and start afresh rather than never.
            let aside = store.set_aside().map_err(|e| RunError::Other(e.into()))?;
            warn!(error = %e, moved_to = %aside.display(), error_code = "DEP_E302", "state unreadable; starting with an empty state");
            Default::default()
        }
    };
    let (deployments, broken) = config::load_deployments_dir(&config.deployments_dir);
    for (file, errors) in &broken {
        for e in errors {
            error!(file = %file.display(), "{e}");
        }
    }

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let reporter = MqttReporter::start(
        &config.mqtt,
        &config.device_id,
        offline_doc(),
        shutdown.child_token(),
        &tracker,
    )
    .context("cannot set up MQTT")
    .map_err(RunError::Config)?;
    let reporter = Arc::new(reporter);
    let runtime = Arc::new(DockerRuntime::new(&config.docker.host));

    spawn_signal_handler(shutdown.clone());
    let supervisor = Supervisor::from_parts(Parts {
        config,
        deployments,
        runtime,
        reporter: reporter.clone(),
        store,
        state,
        boot_id,
        registries,
        notifier: Notifier::from_env(),
    });
    supervisor.run(shutdown.clone()).await;
    reporter.shutdown().await;
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
