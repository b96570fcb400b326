use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use datastorage::{
    cli::{
        audit::{self, AuditArgs},
        jobs::{self, JobsArgs},
    },
    config::Settings,
    startup::{shutdown_signal, Application},
    storage, telemetry,
};

/// The platform's audit-trail storage service.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Optional TOML configuration file; DATASTORAGE_* env vars override it.
    #[arg(long, global = true, env = "DATASTORAGE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC (and HTTP health) until SIGTERM or Ctrl-C.
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Start, inspect, cancel and watch maintenance jobs on a running server.
    Jobs(JobsArgs),
    /// Save a signed audit export, check one offline, or make a signing key.
    Audit(AuditArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve => {
            let (settings, telemetry) = server_settings(cli.config.as_deref())?;
            let served = async {
                Application::build(settings)
                    .await?
                    .run_until_stopped(shutdown_signal())
                    .await
            }
            .await;
            if let Err(error) = &served {
                tracing::error!(error = format!("{error:#}"), "the server stopped");
            }
            // Spans still buffered are exported before the process exits. The
            // export runs on this runtime, so wait for it off its worker threads.
            tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
            served?;
        }
        Command::Migrate => {
            let settings = Settings::load_for_migrations(cli.config.as_deref())?;
            let telemetry = telemetry::init(settings.log.format);
            let pool = storage::pool(&settings.database, &settings.search)?;
            storage::MIGRATOR.run(&pool).await.context("running migrations")?;
            tracing::info!("migrations applied");
            tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
        }
        // A client of a running server: no server configuration, and no logs
        // mixed into its output.
        Command::Jobs(args) => return Ok(jobs::run(args).await),
        Command::Audit(args) => return Ok(audit::run(args).await),
    }
    Ok(ExitCode::SUCCESS)
}

/// The server's configuration, with telemetry started as it says.
fn server_settings(config: Option<&Path>) -> anyhow::Result<(Settings, telemetry::Telemetry)> {
    let settings = Settings::load(config)?;
    let telemetry = telemetry::init(settings.log.format);
    Ok((settings, telemetry))
}
