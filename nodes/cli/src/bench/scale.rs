//! `bench scale`: memory per live and per dormant twin, and the time to wake one.

use std::time::{Duration, Instant};

use serde::Serialize;

use twinmesh_proto::v1::twin_service_client::TwinServiceClient;
use twinmesh_twins::proto::GetTwinRequest;

use super::rig::*;
use super::{BenchArgs, ScalePhase};
use twinmesh_nodes::RunningNode;

#[derive(Debug, Serialize, serde::Deserialize)]
pub(crate) struct LivePhase {
    pub(crate) twins: usize,
    pub(crate) node_rss_bytes: u64,
    pub(crate) live_rss_bytes: u64,
    pub(crate) bytes_per_live_twin: f64,
    pub(crate) start_seconds: f64,
    pub(crate) stop_seconds: f64,
}

/// Starts `--twins` twins (every kind in turn) on a lone edge node and measures its
/// resident memory once they all run idle.
async fn scale_live(args: &BenchArgs) -> anyhow::Result<LivePhase> {
    use twinmesh_actors::node::NodeMsg;
    let dir = tempfile::tempdir()?;
    let mut cfg = scale_node_config(dir.path())?;
    cfg.normalize()?;
    let node = RunningNode::start(cfg).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let node_rss = rss_bytes();
    let supervisor = node.supervisor().expect("edge supervisor");
    let start = Instant::now();
    for i in 0..args.twins {
        supervisor.cast(NodeMsg::Place(scale_placement("", i, SCALE_NODE)))?;
    }
    let ctx = node.ctx.clone();
    wait_for("live twins", args.twins, Duration::from_secs(1800), || {
        ctx.directory.len()
    })
    .await?;
    let start_seconds = start.elapsed().as_secs_f64();
    // Let start-up publications and timers settle before reading memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let live_rss = rss_bytes();
    let stop = Instant::now();
    node.stop().await?;
    Ok(LivePhase {
        twins: args.twins,
        node_rss_bytes: node_rss,
        live_rss_bytes: live_rss,
        bytes_per_live_twin: live_rss.saturating_sub(node_rss) as f64 / args.twins.max(1) as f64,
        start_seconds,
        stop_seconds: stop.elapsed().as_secs_f64(),
    })
}

/// Registers `--registered` dormant twins in a node database, as an edge that
/// passivated them leaves it.
fn scale_seed(args: &BenchArgs, data: &std::path::Path) -> anyhow::Result<f64> {
    use twinmesh_actors::ports::{Durable, PlacementStore};
    let start = Instant::now();
    let store = twinmesh_nodes::store::SledStore::open(data, 64)?;
    for i in 0..args.registered {
        let mut p = scale_placement("r", i, SCALE_NODE);
        p.status = twinmesh_actors::node::STATUS_DORMANT.into();
        store.save_hosted(&p)?;
    }
    futures::executor::block_on(store.flush())?;
    Ok(start.elapsed().as_secs_f64())
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub(crate) struct RegisteredPhase {
    pub(crate) registered: usize,
    /// Time the seed phase took to write the records (filled in by the parent).
    #[serde(default)]
    pub(crate) seed_seconds: f64,
    pub(crate) process_rss_bytes: u64,
    pub(crate) loaded_rss_bytes: u64,
    pub(crate) bytes_per_registered_twin: f64,
    pub(crate) load_seconds: f64,
    pub(crate) woken: usize,
    pub(crate) wake_p50_ms: f64,
    pub(crate) wake_p99_ms: f64,
    pub(crate) wake_max_ms: f64,
    pub(crate) after_wake_rss_bytes: u64,
}

/// Starts an edge node on the seeded database (its dormant twins registered, none
/// running) and wakes `--wake` of them, one call at a time, through its gRPC API.
async fn scale_registered(
    args: &BenchArgs,
    data: &std::path::Path,
) -> anyhow::Result<RegisteredPhase> {
    let process_rss = rss_bytes();
    let mut cfg = scale_node_config(data)?;
    cfg.grpc = Some("127.0.0.1:0".parse()?);
    cfg.passivate_after_s = 600;
    cfg.normalize()?;
    let start = Instant::now();
    let node = RunningNode::start(cfg).await?;
    let ctx = node.ctx.clone();
    wait_for(
        "registered twins",
        args.registered,
        Duration::from_secs(1800),
        || ctx.directory.len(),
    )
    .await?;
    let load_seconds = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded_rss = rss_bytes();
    let endpoint = format!("http://{}", node.grpc_addr.expect("grpc"));
    let mut client = TwinServiceClient::connect(endpoint).await?;
    let woken = args.wake.min(args.registered);
    let step = (args.registered / woken.max(1)).max(1);
    let mut latencies = Vec::with_capacity(woken);
    for i in (0..args.registered).step_by(step).take(woken) {
        let id = scale_placement("r", i, SCALE_NODE).twin_id;
        let t0 = Instant::now();
        let twin = client
            .get_twin(GetTwinRequest {
                twin_id: id.clone(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("waking {id}: {e}"))?
            .into_inner();
        anyhow::ensure!(twin.twin_id == id, "asked for {id}, got {}", twin.twin_id);
        latencies.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let woken_count = twinmesh_actors::metrics::NodeMetrics::get(&ctx.metrics.twins_woken);
    anyhow::ensure!(
        woken_count == woken as u64,
        "{woken} calls woke {woken_count} twins"
    );
    let after_wake_rss = rss_bytes();
    node.stop().await?;
    let (p50, p99, max) = percentiles(latencies);
    Ok(RegisteredPhase {
        registered: args.registered,
        seed_seconds: 0.0,
        process_rss_bytes: process_rss,
        loaded_rss_bytes: loaded_rss,
        bytes_per_registered_twin: loaded_rss.saturating_sub(process_rss) as f64
            / args.registered.max(1) as f64,
        load_seconds,
        woken,
        wake_p50_ms: p50,
        wake_p99_ms: p99,
        wake_max_ms: max,
        after_wake_rss_bytes: after_wake_rss,
    })
}

#[derive(Debug, Serialize)]
pub(crate) struct ScaleReport {
    pub(crate) machine: String,
    pub(crate) live: LivePhase,
    pub(crate) registered: RegisteredPhase,
}

/// Runs one phase of `bench scale` in a child process and reads its JSON.
async fn scale_child<T: serde::de::DeserializeOwned>(
    args: &BenchArgs,
    phase: &str,
    data: Option<&std::path::Path>,
) -> anyhow::Result<T> {
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.args(["bench", "scale", "--json", "--phase", phase])
        .args(["--twins", &args.twins.to_string()])
        .args(["--registered", &args.registered.to_string()])
        .args(["--wake", &args.wake.to_string()])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    if let Some(d) = data {
        cmd.arg("--data").arg(d);
    }
    let out = cmd.output().await?;
    anyhow::ensure!(
        out.status.success(),
        "bench scale phase {phase} failed ({})",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| anyhow::anyhow!("phase {phase} printed no result"))?;
    Ok(serde_json::from_str(line)?)
}

pub(super) async fn bench_scale(args: &BenchArgs) -> anyhow::Result<Option<ScaleReport>> {
    match args.phase {
        Some(ScalePhase::Live) => {
            println!("{}", serde_json::to_string(&scale_live(args).await?)?);
            Ok(None)
        }
        Some(phase @ (ScalePhase::Seed | ScalePhase::Registered)) => {
            let data = args
                .data
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("--phase {phase:?} needs --data DIR"))?;
            if phase == ScalePhase::Seed {
                let seconds = scale_seed(args, data)?;
                println!("{}", serde_json::json!({ "seconds": seconds }));
            } else {
                let r = scale_registered(args, data).await?;
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(None)
        }
        None => {
            eprintln!("scale: {} live twins on one edge node ...", args.twins);
            let live: LivePhase = scale_child(args, "live", None).await?;
            eprintln!("  {}", serde_json::to_string(&live)?);
            let dir = tempfile::tempdir()?;
            eprintln!("scale: registering {} dormant twins ...", args.registered);
            let seeded: serde_json::Value = scale_child(args, "seed", Some(dir.path())).await?;
            let seed_seconds = seeded["seconds"].as_f64().unwrap_or(0.0);
            eprintln!(
                "scale: starting an edge node with them, waking {} ...",
                args.wake
            );
            let mut registered: RegisteredPhase =
                scale_child(args, "registered", Some(dir.path())).await?;
            registered.seed_seconds = seed_seconds;
            Ok(Some(ScaleReport {
                machine: machine(),
                live,
                registered,
            }))
        }
    }
}
