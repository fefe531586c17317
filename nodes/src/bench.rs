//! `twinmesh bench`: measurements of the real mesh on this machine.

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BenchKind {
    /// Samples/s from a gateway through Zenoh into a twin, durable in sled.
    Ingest,
    /// GetTwin calls/s and latency through gRPC on one node for a twin on another.
    Rpc,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    pub kind: BenchKind,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
    /// Length of the measured phase in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench {:?} is not available yet", args.kind)
}
