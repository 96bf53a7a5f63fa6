//! `llmapi-bench`: benchmark_serving.py's command line, plus `llmapi-bench sweep`.

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use llmapi_bench::args::BenchArgs;
use llmapi_bench::runner::RunError;
use llmapi_bench::sweep::SweepArgs;
use llmapi_bench::{app, sweep};
use llmapi_common::telemetry::LogArgs;
use tokio::sync::watch;

/// Benchmark the online serving throughput of an OpenAI-compatible server.
#[derive(Debug, Parser)]
#[command(
    name = "llmapi-bench",
    version,
    after_help = "Run `llmapi-bench sweep --concurrency 1,2,4 --multi-round 5 ...` for a \
                  concurrency sweep with CSV, Markdown and plots."
)]
struct BenchCli {
    #[command(flatten)]
    bench: BenchArgs,
    #[command(flatten)]
    log: LogArgs,
}

/// Run the benchmark at several concurrency levels and summarise them.
#[derive(Debug, Parser)]
#[command(name = "llmapi-bench sweep", version)]
struct SweepCli {
    #[command(flatten)]
    sweep: SweepArgs,
    #[command(flatten)]
    log: LogArgs,
}

/// The client logs only warnings unless `--log_level` or RUST_LOG says otherwise: its
/// report is the output.
const DEFAULT_LOG_LEVEL: &str = "warning";

/// Exit status after Ctrl-C, as shells report SIGINT.
const INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    match run() {
        Ok(interrupted) if interrupted => ExitCode::from(INTERRUPTED),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) if is_interruption(&e) => {
            eprintln!("{e}");
            ExitCode::from(INTERRUPTED)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// True when Ctrl-C came before the benchmark started (nothing to report).
fn is_interruption(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<app::BenchError>(),
        Some(app::BenchError::Run(RunError::Interrupted))
    )
}

/// Parses the command line and runs; `Ok(true)` when Ctrl-C cut the run short.
fn run() -> anyhow::Result<bool> {
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    let is_sweep = argv.get(1).is_some_and(|a| a == "sweep");
    // One thread: the client's own cost stays on one core and timestamps stay comparable.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let stop = ctrl_c_watch();
        if is_sweep {
            // Usage lines then read "llmapi-bench sweep".
            argv.remove(1);
            argv[0] = OsString::from("llmapi-bench sweep");
            let cli = SweepCli::parse_from(argv);
            cli.log
                .init(DEFAULT_LOG_LEVEL)
                .map_err(anyhow::Error::msg)?;
            let out = sweep::sweep(&cli.sweep, stop).await?;
            println!("Sweep wrote:");
            for f in &out.files {
                println!("  {}", f.display());
            }
            Ok(out.interrupted)
        } else {
            let cli = BenchCli::parse_from(argv);
            cli.log
                .init(DEFAULT_LOG_LEVEL)
                .map_err(anyhow::Error::msg)?;
            let done = app::benchmark(&cli.bench, stop).await?;
            if let Some(path) = &done.saved_to {
                println!("Result saved to {}", path.display());
            }
            Ok(done.interrupted)
        }
    })
}

/// A flag that turns true on the first Ctrl-C; a second Ctrl-C exits at once.
fn ctrl_c_watch() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("Ctrl-C: stopping; press it again to quit without a report");
            let _ = tx.send(true);
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(i32::from(INTERRUPTED));
            }
        }
    });
    rx
}
