//! The `twinmesh` binary: parse arguments, set up logging, run.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use twinmesh_nodes::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Benchmarks and the client stay quiet unless asked; nodes report what they do.
    let default_filter = match cli.command {
        Command::Up(_) | Command::Node(_) => "warn,twinmesh=info",
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): not an error of ours.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
                    || c.downcast_ref::<csv::Error>().is_some_and(|ce| {
                        matches!(ce.kind(), csv::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe)
                    })
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => {
            let opts = twinmesh_nodes::up::UpOptions {
                assets_per_kind: args.assets_per_kind,
                grpc: args.grpc,
                http: args.http,
                zenoh: args.zenoh,
                data: args.data,
                seed: args.seed,
                passivate_after_s: args.passivate_after,
                secure: args.secure,
            };
            twinmesh_nodes::up::up(opts, shutdown_signal()).await
        }
        Command::Node(args) => twinmesh_nodes::run(args.into_config()?, shutdown_signal()).await,
        Command::Ctl(args) => twinmesh_nodes::ctl::run(args).await,
        Command::Bench(args) => twinmesh_nodes::bench::run(args).await,
        Command::Eval(args) => twinmesh_nodes::eval::run(args, &mut std::io::stdout().lock()),
        Command::Sim(args) => twinmesh_nodes::tools::sim(args, &mut std::io::stdout().lock()),
        Command::Dsp(args) => {
            twinmesh_nodes::tools::dsp(args, std::io::stdin().lock(), &mut std::io::stdout().lock())
        }
        Command::Ingest(args) => twinmesh_nodes::tools::ingest(args).await,
        Command::Keys(args) => twinmesh_nodes::keys::run(args),
        Command::Certs(args) => twinmesh_nodes::certs::run(args),
        Command::Acl(args) => twinmesh_nodes::acl::run(args),
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
