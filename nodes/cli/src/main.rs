//! The `twinmesh` binary: parse arguments, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use twinmesh_cli::args::{Cli, Command};
use twinmesh_nodes::telemetry::{self, TraceConfig};

fn main() -> ExitCode {
    // Before any thread exists: Zenoh reads its pool layout once.
    twinmesh_nodes::fabric::default_zenoh_runtime();
    let cli = Cli::parse();
    // Benchmarks and the client stay quiet unless asked; nodes report what they do.
    let default_filter = match cli.command {
        Command::Up(_) | Command::Node(_) | Command::Router(_) => "warn,twinmesh=info",
        Command::Ctl(_)
        | Command::Bench(_)
        | Command::Eval(_)
        | Command::Sim(_)
        | Command::Dsp(_)
        | Command::Ingest(_)
        | Command::Keys(_)
        | Command::Certs(_)
        | Command::Acl(_) => "warn",
    };
    if !matches!(
        cli.command,
        Command::Up(_) | Command::Node(_) | Command::Router(_)
    ) {
        twinmesh_cli::quiet_on_closed_stdout();
    }
    // Traces of the node (or of `up`'s nodes), when an OTLP endpoint is given.
    let trace = match &cli.command {
        Command::Node(a) => a.trace.otlp_endpoint.clone().map(|endpoint| TraceConfig {
            endpoint,
            ingest_ratio: a.trace.trace_ingest_ratio,
            service: format!("twinmesh-{}", a.id.as_deref().unwrap_or("node")),
        }),
        Command::Up(a) => a.trace.otlp_endpoint.clone().map(|endpoint| TraceConfig {
            endpoint,
            ingest_ratio: a.trace.trace_ingest_ratio,
            service: "twinmesh-up".to_owned(),
        }),
        // A benchmark's nodes trace as a node would, when asked through the environment
        // (to measure what tracing costs: BENCHMARKS.md).
        Command::Bench(_) => std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
            .ok()
            .map(|endpoint| TraceConfig {
                endpoint,
                ingest_ratio: std::env::var("TWINMESH_TRACE_INGEST_RATIO")
                    .ok()
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0.01),
                service: "twinmesh-bench".to_owned(),
            }),
        _ => None,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tracing = match runtime.block_on(async { telemetry::init(default_filter, trace) }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let outcome = twinmesh_cli::run(cli, shutdown_signal()).await;
        // What is still buffered goes out before the process ends.
        let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
        outcome
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): not an error of ours.
        Err(e) if twinmesh_cli::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Cancelled on Ctrl-C or SIGTERM.
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        t.cancel();
    });
    token
}
