//! The `cvserve` binary: `cvserve serve` (the default) runs the server.

use clap::{Parser, Subcommand};

use cvserve::config::ServeConfig;

/// A Roboflow-compatible inference server for computer-vision ONNX models.
#[derive(Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeConfig,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the models of the repository over HTTP (the default).
    Serve(ServeConfig),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOG_LEVEL")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Some(Command::Serve(cfg)) => cvserve::server::run(cfg),
        None => cvserve::server::run(cli.serve),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("cvserve: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
