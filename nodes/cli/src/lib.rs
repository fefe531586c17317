//! The `twinmesh` binary's commands: everything a user types, each in its own module,
//! on top of the node daemon library (`twinmesh-nodes`). `main.rs` only parses the
//! arguments, sets up logging and calls [`run`].
//!
//! # Layout
//!
//! - [`args`]: the command line ([`args::Cli`]), and `node`'s flags into a
//!   [`twinmesh_nodes::config::NodeConfig`].
//! - [`up`]: the whole mesh in one process (`twinmesh up`).
//! - [`ctl`]: the `twinmesh ctl` gRPC client.
//! - [`admin`]: `twinmesh certs`, `twinmesh keys`, `twinmesh acl`.
//! - [`tools`]: `twinmesh sim`, `twinmesh dsp`, `twinmesh ingest`.
//! - [`bench`]: `twinmesh bench` (BENCHMARKS.md).
//! - [`eval`]: `twinmesh eval`, detection delays and false alarms of the anomaly
//!   models (EVALUATION.md).

pub mod admin;
pub mod args;
pub mod bench;
pub mod ctl;
pub mod eval;
pub mod tools;
pub mod up;

use tokio_util::sync::CancellationToken;

use args::{Cli, Command};

/// Runs one command of the binary; `shutdown` ends `up` and `node`.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => {
            let opts = crate::up::UpOptions {
                assets_per_kind: args.assets_per_kind,
                grpc: args.grpc,
                http: args.http,
                zenoh: args.zenoh,
                data: args.data,
                seed: args.seed,
                passivate_after_s: args.passivate_after,
                secure: args.secure,
            };
            crate::up::up(opts, shutdown).await
        }
        Command::Node(args) => Ok(twinmesh_nodes::run(args.into_config()?, shutdown).await?),
        Command::Router(args) => {
            Ok(twinmesh_nodes::run_router(args.into_config()?, shutdown).await?)
        }
        Command::Ctl(args) => crate::ctl::run(args).await,
        Command::Bench(args) => crate::bench::run(args).await,
        Command::Eval(args) => crate::eval::run(args, &mut std::io::stdout().lock()),
        Command::Sim(args) => crate::tools::sim(args, &mut std::io::stdout().lock()),
        Command::Dsp(args) => {
            crate::tools::dsp(args, std::io::stdin().lock(), &mut std::io::stdout().lock())
        }
        Command::Ingest(args) => crate::tools::ingest(args).await,
        Command::Keys(args) => crate::admin::keys(args, &mut std::io::stdout().lock()),
        Command::Certs(args) => crate::admin::certs(args, &mut std::io::stdout().lock()),
        Command::Acl(args) => crate::admin::acl(args, &mut std::io::stdout().lock()),
    }
}

/// A client command whose reader goes away (`twinmesh ctl twins | head`) ends quietly,
/// as `cat` does, instead of panicking in `println!`: the default SIGPIPE action is
/// restored (Rust ignores SIGPIPE). Not for `node` and `up`, which must outlive any one
/// closed pipe; sockets are written with `MSG_NOSIGNAL` and never raise it.
pub fn quiet_on_closed_stdout() {
    #[cfg(unix)]
    // SAFETY: called once at start, before any thread exists; SIG_DFL is a valid action.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Whether `e` is a write to a closed stdout (reported as an error, not a signal, where
/// SIGPIPE stays ignored).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<csv::Error>().is_some_and(|ce| {
                matches!(ce.kind(), csv::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe)
            })
    })
}
