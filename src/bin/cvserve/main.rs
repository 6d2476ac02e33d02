//! The `cvserve` binary: `cvserve serve` (the default) runs the server; `cvserve bench`
//! load-tests one; `cvserve ceiling` and `cvserve decode-time` measure the network and the
//! decode alone.

mod bench;
mod bench_v2;
mod ceiling;
mod decode_time;

use clap::{Parser, Subcommand};

use bench::BenchConfig;
use cvserve::config::ServeConfig;

/// mimalloc: fast with many threads, and with its default purge delay it keeps freed pages
/// for reuse while the server is busy (no page faults per request). Memory goes back to the
/// OS once the server is idle (`cvserve::memory`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    Serve(Box<ServeConfig>),
    /// Load-test a Roboflow-compatible server (this one or Roboflow Inference).
    Bench(BenchConfig),
    /// Measure a model's in-process ceiling (back end alone, best batch size).
    Ceiling(ceiling::CeilingConfig),
    /// Time the server's decode of image files (CPU per image, whole and reduced).
    DecodeTime(decode_time::DecodeTimeConfig),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    raise_fd_limit();
    cvserve::memory::keep_freed_memory_for_reuse();
    let (name, result) = match cli.command {
        Some(Command::Bench(bench)) => {
            init_logging("text");
            ("cvserve bench", bench::run(bench).map(drop))
        }
        Some(Command::Ceiling(c)) => {
            init_logging("text");
            ("cvserve ceiling", ceiling::run(c).map(drop))
        }
        Some(Command::DecodeTime(c)) => {
            init_logging("text");
            ("cvserve decode-time", decode_time::run(c))
        }
        Some(Command::Serve(cfg)) => serve(*cfg),
        None => serve(cli.serve),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn serve(cfg: ServeConfig) -> (&'static str, anyhow::Result<()>) {
    init_logging(&cfg.log_format);
    ("cvserve", cvserve::server::run(cfg))
}

/// Structured logs on stderr; the level from LOG_LEVEL (or RUST_LOG), default info.
fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOG_LEVEL")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Each connection is a file descriptor: lift the soft limit to the hard one, so a thousand
/// concurrent clients do not run into the usual default of 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
