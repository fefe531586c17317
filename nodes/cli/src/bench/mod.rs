//! `twinmesh bench`: measurements of the real mesh on this machine (real Zenoh sessions,
//! real sled databases, real gRPC), in one process on loopback. Numbers go to
//! BENCHMARKS.md; nothing here is asserted by tests.

//!
//! # Layout
//!
//! - [`rig`]: the shared rig and helpers.
//! - [`ingest`], [`rpc`], [`dsp`], [`movement`], [`scale`]: one measurement each.
//! - [`models`], [`privacy`]: anomaly models and DP releases.
//! - [`mqtt`]: a real device's samples from mosquitto through a gateway into a twin.

mod dsp;
mod ingest;
mod models;
mod movement;
mod mqtt;
mod privacy;
mod rig;
mod rpc;
mod scale;

use clap::{Args, ValueEnum};

use twinmesh_twins::Tier;

use dsp::bench_dsp;
use ingest::bench_ingest;
use movement::{bench_failover, bench_migrate};
use rig::machine;
use rpc::bench_rpc;
use scale::bench_scale;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BenchKind {
    /// Samples/s from a gateway through Zenoh into twins, acknowledged once durable in
    /// sled; and the raw Zenoh rate of the same frames between the same two sessions.
    Ingest,
    /// GetTwin calls/s and latency through gRPC on one node for a twin on another node.
    Rpc,
    /// Signal operators on one core (psd, envelope, filter vs a bare FFT) and the frame
    /// codec (ratio, MB/s) on simulated 16-bit vibration.
    Dsp,
    /// Ingest as `ingest`, twice in one run: plain TCP links, then mutual TLS on every
    /// link (and TLS gRPC); the loss TLS costs.
    Tls,
    /// DP release latency through gRPC: one twin (10,000 samples) and a set release over
    /// `--twins` twins of one site (coordinated on the site, sealed contributions).
    Privacy,
    /// Live migrations of a wind-turbine twin between two edges while its gateway streams
    /// 10 kHz vibration: duration p50/p99.
    Migrate,
    /// `kill -9` of the edge hosting a twin (separate processes): time until the twin
    /// answers from the other edge.
    Failover,
    /// Twins on one edge node: resident memory per live idle twin (`--twins`), and per
    /// registered dormant twin with passivation (`--registered`), with the time a call
    /// takes to wake a dormant twin. Each phase runs in a fresh process.
    Scale,
    /// Anomaly models on one core: training time on `--rows` feature vectors and the
    /// cost of scoring one window, per algorithm.
    Models,
    /// `--samples` values published to mosquitto (QoS 1): samples/s through a gateway's
    /// MQTT device into a twin's history, against mosquitto's own delivery rate of the
    /// same messages to a plain subscriber, in the same run.
    Mqtt,
    /// `--twins` twins on one edge node, each fed one frame a second that completes a
    /// feature window scored by its model: windows scored per second and CPU used.
    Scored,
}

/// A phase of `bench scale`, run in a child process of its own (so resident memory
/// starts from a clean process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScalePhase {
    Live,
    Seed,
    Registered,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    pub kind: BenchKind,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// Length of each measured phase in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// ingest: twins fed in parallel; rpc: concurrent callers.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// ingest: samples per frame.
    #[arg(long, default_value_t = 1024)]
    pub frame_samples: usize,
    /// ingest: unacknowledged frames in flight per twin (at most a twin's ingest queue).
    #[arg(long, default_value_t = 256)]
    pub window: u64,
    /// scale: live twins started on one node.
    #[arg(long, default_value_t = 100_000)]
    pub twins: usize,
    /// scale: dormant twins registered on one node.
    #[arg(long, default_value_t = 1_000_000)]
    pub registered: usize,
    /// scale: dormant twins woken by a call, one after the other.
    #[arg(long, default_value_t = 1000)]
    pub wake: usize,
    /// mqtt: values published.
    #[arg(long, default_value_t = 20_000)]
    pub samples: u64,
    /// models: feature vectors to train on.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: usize,
    /// ingest, tls: liveliness lease of the two nodes, ms.
    #[arg(long, default_value_t = 2000)]
    pub lease_ms: u64,
    /// tls: the encrypted Zenoh link, quic or tls (Zenoh's tls link can stall under
    /// load in both directions, eclipse-zenoh/zenoh#2557).
    #[arg(long, default_value = "quic", value_parser = ["quic", "tls"])]
    pub link: String,
    #[arg(long, hide = true)]
    pub phase: Option<ScalePhase>,
    #[arg(long, hide = true)]
    pub data: Option<std::path::PathBuf>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.seconds > 0.0 && args.seconds <= 600.0,
        "--seconds must be in (0, 600]"
    );
    anyhow::ensure!(
        args.parallel > 0 && args.parallel <= 1024,
        "--parallel must be in 1..=1024"
    );
    anyhow::ensure!(
        args.frame_samples > 0
            && args.frame_samples * 8
                < twinmesh_nodes::config::NodeConfig::new("x".parse()?, Tier::Edge, "x")
                    .max_frame_bytes,
        "--frame-samples must fit a frame under the 1 MiB limit"
    );
    let queue = twinmesh_actors::context::TwinConfig::default().ingest_queue as u64;
    anyhow::ensure!(
        args.window > 0 && args.window <= queue,
        "--window must be in 1..={queue} (a twin's ingest queue): this publisher does not re-send frames a full queue drops, as the gateway does"
    );
    match args.kind {
        BenchKind::Mqtt => {
            anyhow::ensure!(
                (1..=1_000_000).contains(&args.samples),
                "--samples must be in 1..=1000000"
            );
            let r = mqtt::bench_mqtt(args.samples, machine()).await?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "mqtt: {} values, QoS 1, one mosquitto, {}",
                    r.samples, r.machine
                );
                println!(
                    "  mosquitto → plain subscriber        : {:>10.0} msgs/s",
                    r.broker_msgs_per_s
                );
                println!(
                    "  mosquitto → gateway → twin (durable): {:>10.0} samples/s ({} stored)",
                    r.gateway_samples_per_s, r.gateway_samples_stored
                );
                println!(
                    "  ratio                               : {:.1} %",
                    r.ratio * 100.0
                );
            }
        }
        BenchKind::Scored => {
            anyhow::ensure!(
                (1..=200_000).contains(&args.twins),
                "--twins must be in 1..=200000"
            );
            let r = models::bench_scored(args.twins, args.seconds, machine()).await?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "scored: {} twins on one edge node, one window a second each, {:.0} s, {}",
                    r.twins, r.seconds, r.machine
                );
                println!("  offered {:.0} windows/s, scored {:.0} windows/s ({:.1} %), {} features per window", r.offered_windows_per_s, r.scored_windows_per_s, 100.0 * r.scored_windows_per_s / r.offered_windows_per_s.max(1e-9), r.features);
                println!(
                    "  process CPU {:.2} cores (node, twins and the frame publisher)",
                    r.cores_used
                );
            }
        }
        BenchKind::Models => {
            anyhow::ensure!(
                (10..=10_000_000).contains(&args.rows),
                "--rows must be in 10..=10000000"
            );
            let (rows, json) = (args.rows, args.json);
            let r = tokio::task::spawn_blocking(move || models::bench_models(rows, machine()))
                .await??;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("models: one core, {}", r.machine);
                for a in &r.algorithms {
                    println!(
                        "  {:<18} {} features: train {:>7.2} s on {} rows, model {} bytes, score {:.2} µs/window (p99 {:.2} µs)",
                        a.algorithm, a.features, a.train_seconds, a.train_rows, a.model_bytes, a.score_mean_us, a.score_p99_us
                    );
                }
            }
        }
        BenchKind::Tls => {
            // Same run, same machine: plain links first, then mutual TLS on every link.
            let plain = bench_ingest(&args, "tcp").await?;
            let tls = bench_ingest(&args, &args.link).await?;
            let loss =
                1.0 - tls.end_to_end_samples_per_s / plain.end_to_end_samples_per_s.max(1e-9);
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"plain": plain, "tls": tls, "link": args.link, "loss": loss})
                );
            } else {
                println!(
                    "tls: {} twins, {}-sample frames, {:.0} s per phase, {}",
                    plain.twins, plain.frame_samples, plain.seconds, plain.machine
                );
                let secure = format!("mtls {}", args.link);
                for (name, r) in [("plain tcp", &plain), (secure.as_str(), &tls)] {
                    println!(
                        "  {name:<10} end to end {:>12.0} samples/s  ack p50 {:.2} ms p99 {:.2} ms  raw zenoh {:>12.0} samples/s",
                        r.end_to_end_samples_per_s,
                        r.ack_latency_p50_ms,
                        r.ack_latency_p99_ms,
                        r.raw_zenoh_samples_per_s
                    );
                }
                println!("  loss with TLS (end to end): {:.1} %", loss * 100.0);
            }
        }
        BenchKind::Privacy => {
            let twins = if args.twins == 100_000 {
                1000
            } else {
                args.twins.min(10_000)
            };
            let r = privacy::bench_privacy(twins, machine()).await?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                r.print();
            }
        }
        BenchKind::Ingest => {
            let r = bench_ingest(&args, "tcp").await?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "ingest: {} twins, {}-sample frames, window {} frames, {:.0} s, {}",
                    r.twins, r.frame_samples, r.window_frames, r.seconds, r.machine
                );
                println!(
                    "  end to end (acked after sled flush): {:>14.0} samples/s  ({:.0} frames/s)",
                    r.end_to_end_samples_per_s, r.end_to_end_frames_per_s
                );
                println!(
                    "  ack latency                        : p50 {:.2} ms, p99 {:.2} ms",
                    r.ack_latency_p50_ms, r.ack_latency_p99_ms
                );
                println!(
                    "  raw zenoh, same frames and sessions: {:>14.0} samples/s  ({:.0} msgs/s)",
                    r.raw_zenoh_samples_per_s, r.raw_zenoh_msgs_per_s
                );
                println!(
                    "  ratio end-to-end / raw             : {:.1} %",
                    r.ratio_to_raw * 100.0
                );
                println!(
                    "  edge database                      : {} bytes, {:.2} bytes/sample",
                    r.edge_store_bytes, r.stored_bytes_per_sample
                );
            }
        }
        BenchKind::Dsp => {
            let r = tokio::task::spawn_blocking(move || bench_dsp(&args).map(|r| (r, args.json)))
                .await??;
            let (r, json) = r;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("dsp: one core, {}", r.machine);
                println!(
                    "  bare rustfft, 1024 points       : {:>14.0} samples/s",
                    r.fft_1024_samples_per_s
                );
                println!("  psd (welch, nperseg 1024)       : {:>14.0} samples/s ({:.0} % of the bare FFT)", r.psd_1024_samples_per_s, r.psd_ratio_to_fft * 100.0);
                println!(
                    "  envelope (hilbert, 10000 points): {:>14.0} samples/s",
                    r.envelope_10000_samples_per_s
                );
                println!(
                    "  sosfilt, order-8 band-pass      : {:>14.0} samples/s",
                    r.sosfilt_order8_samples_per_s
                );
                println!("  codec, simulated 16-bit vibration: {:.2}x smaller than f64 ({:.2} bytes/sample), encode {:.0} MB/s, decode {:.0} MB/s", r.codec_ratio, r.codec_bytes_per_sample, r.codec_encode_mb_per_s, r.codec_decode_mb_per_s);
                println!("  codec, same at full 16-bit scale : {:.2}x smaller than f64, encode {:.0} MB/s", r.codec_full_scale_ratio, r.codec_full_scale_encode_mb_per_s);
            }
        }
        BenchKind::Migrate | BenchKind::Failover => {
            let r = match args.kind {
                BenchKind::Migrate => bench_migrate(&args).await?,
                _ => bench_failover(&args).await?,
            };
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let what = match args.kind {
                    BenchKind::Migrate => "migrate: live migration between two edges under 10 kHz ingest",
                    _ => "failover: kill -9 of the hosting edge until the twin answers from the other",
                };
                println!(
                    "{what}, {} runs, lease {} ms, {}",
                    r.runs, r.lease_ms, r.machine
                );
                println!(
                    "  p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                    r.p50_ms, r.p99_ms, r.max_ms
                );
            }
        }
        BenchKind::Scale => {
            anyhow::ensure!(
                (1..=1_000_000).contains(&args.twins),
                "--twins must be in 1..=1000000"
            );
            anyhow::ensure!(
                (1..=10_000_000).contains(&args.registered),
                "--registered must be in 1..=10000000"
            );
            anyhow::ensure!(args.wake >= 1, "--wake must be at least 1");
            let Some(r) = bench_scale(&args).await? else {
                return Ok(());
            };
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
                let (l, g) = (&r.live, &r.registered);
                println!("scale: one edge node, {}", r.machine);
                println!(
                    "  live idle twins      : {} started in {:.1} s, node {:.0} MiB -> {:.0} MiB, {:.0} bytes per twin (stop {:.1} s)",
                    l.twins, l.start_seconds, mb(l.node_rss_bytes), mb(l.live_rss_bytes), l.bytes_per_live_twin, l.stop_seconds
                );
                println!(
                    "  registered (dormant) : {} (written in {:.1} s, loaded in {:.1} s), process {:.0} MiB -> {:.0} MiB, {:.0} bytes per twin",
                    g.registered, g.seed_seconds, g.load_seconds, mb(g.process_rss_bytes), mb(g.loaded_rss_bytes), g.bytes_per_registered_twin
                );
                println!(
                    "  wake by a call       : {} twins, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {:.0} MiB after",
                    g.woken, g.wake_p50_ms, g.wake_p99_ms, g.wake_max_ms, mb(g.after_wake_rss_bytes)
                );
            }
        }
        BenchKind::Rpc => {
            let r = bench_rpc(&args).await?;
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("rpc: GetTwin via the cloud node's gRPC for a twin on the edge node, {} callers, {:.0} s, {}", r.callers, r.seconds, r.machine);
                println!(
                    "  {:.0} calls/s, p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} calls)",
                    r.calls_per_s, r.p50_ms, r.p99_ms, r.max_ms, r.calls
                );
                for (name, c) in [
                    (
                        "ceiling, bare tonic unary (health check), same server",
                        &r.grpc_ceiling,
                    ),
                    (
                        "ceiling, bare Zenoh query cloud -> edge (node info)",
                        &r.zenoh_ceiling,
                    ),
                    (
                        "twin hop, the GetTwin as a Zenoh query from the cloud (no gRPC)",
                        &r.twin_hop,
                    ),
                ] {
                    println!(
                        "  {name}: {:.0} calls/s, p50 {:.3} ms, p99 {:.3} ms ({:.0} s)",
                        c.calls_per_s, c.p50_ms, c.p99_ms, c.seconds
                    );
                }
                println!(
                    "  GetTwin / bare tonic: {:.0} %, GetTwin / bare Zenoh: {:.0} %",
                    100.0 * r.calls_per_s / r.grpc_ceiling.calls_per_s.max(1.0),
                    100.0 * r.calls_per_s / r.zenoh_ceiling.calls_per_s.max(1.0)
                );
            }
        }
    }
    Ok(())
}
