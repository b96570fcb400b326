use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use datastorage::{
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref())?;
    telemetry::init(settings.log.format);
    match cli.command {
        Command::Serve => {
            let app = Application::build(settings).await?;
            app.run_until_stopped(shutdown_signal()).await
        }
        Command::Migrate => {
            let pool = storage::pool(&settings.database, &settings.search)?;
            storage::MIGRATOR.run(&pool).await.context("running migrations")?;
            tracing::info!("migrations applied");
            Ok(())
        }
    }
}
