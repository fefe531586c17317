//! `twinmesh bench`: measurements of the real mesh on this machine (real Zenoh sessions,
//! real sled databases, real gRPC), in one process on loopback. Numbers go to
//! BENCHMARKS.md; nothing here is asserted by tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use prost::Message;
use serde::Serialize;
use tokio::sync::Notify;
use zenoh::bytes::{Encoding, ZBytes};
use zenoh::qos::CongestionControl;

use twinmesh_proto::encoding;
use twinmesh_proto::v1::twin_service_client::TwinServiceClient;
use twinmesh_twins::proto::{
    GetTwinRequest, Placement, PlacementRequest, TelemetryFrame, Watermark,
};
use twinmesh_twins::Tier;

use crate::config::{NodeConfig, CLOUD_SITE};
use crate::runtime::RunningNode;

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

/// A cloud and an edge node in this process, and a peer session acting as the gateway;
/// with a `tls` or `quic` scheme, every link is mutual TLS (certificates of a fresh CA).
pub(crate) struct Rig {
    /// Holds the rig's databases, certificates and keys until it is dropped.
    _dir: tempfile::TempDir,
    pub(crate) cloud: RunningNode,
    pub(crate) edge: RunningNode,
    pub(crate) gateway: zenoh::Session,
    /// The edge's site key (the gateway seals protected signals with it).
    pub(crate) site_key: twinmesh_actors::seal::KeyRing,
}

impl Rig {
    /// Plain TCP links.
    pub(crate) async fn start() -> anyhow::Result<Rig> {
        Self::start_with("tcp", crate::config::default_lease_ms()).await
    }

    /// Links of `scheme` (`tcp`, or `tls`/`quic` with mutual TLS), the nodes' liveliness
    /// lease in ms.
    pub(crate) async fn start_with(scheme: &str, lease_ms: u64) -> anyhow::Result<Rig> {
        let dir = tempfile::tempdir()?;
        let certs = dir.path().join("certs");
        let tls = scheme != "tcp";
        let tls_of = |name: &str| -> anyhow::Result<Option<crate::config::TlsConfig>> {
            if !tls {
                return Ok(None);
            }
            let (cert, key) = crate::certs::issue(&certs, name, &[], 2)?;
            Ok(Some(crate::config::TlsConfig {
                ca_file: certs.join("ca.pem"),
                cert_file: cert,
                key_file: key,
            }))
        };
        if tls {
            crate::certs::init_ca(&certs, "bench CA", 2)?;
        }
        let key_file = dir.path().join("bench.key");
        crate::keys::new_key_file(&key_file, "k1")?;
        let site_key = crate::config::load_key_ring(&key_file, "site key")?;
        let mut cloud = NodeConfig::new("bench-cloud".parse()?, Tier::Cloud, CLOUD_SITE);
        cloud.listen = vec![format!("{scheme}/127.0.0.1:0")];
        cloud.grpc = Some("127.0.0.1:0".parse()?);
        cloud.data = dir.path().join("cloud");
        cloud.tls = tls_of("bench-cloud")?;
        cloud.lease_ms = lease_ms;
        cloud.normalize()?;
        let cloud = RunningNode::start(cloud).await?;
        let mut edge = NodeConfig::new("bench-edge".parse()?, Tier::Edge, "bench");
        edge.listen = vec![format!("{scheme}/127.0.0.1:0")];
        edge.connect = cloud.locators.clone();
        edge.grpc = Some("127.0.0.1:0".parse()?);
        edge.data = dir.path().join("edge");
        edge.cache_mb = 256;
        edge.tls = tls_of("bench-edge")?;
        edge.lease_ms = lease_ms;
        edge.site_key_file = Some(key_file);
        edge.normalize()?;
        let edge = RunningNode::start(edge).await?;
        let mut c = zenoh::Config::default();
        let set = |c: &mut zenoh::Config, k: &str, v: String| {
            c.insert_json5(k, &v)
                .map_err(|e| anyhow::anyhow!("{k}: {e}"))
        };
        if let Some(t) = tls_of("bench-gateway")? {
            let q = |p: &std::path::Path| format!("{:?}", p.display().to_string());
            set(
                &mut c,
                "transport/link/tls/root_ca_certificate",
                q(&t.ca_file),
            )?;
            set(
                &mut c,
                "transport/link/tls/connect_certificate",
                q(&t.cert_file),
            )?;
            set(
                &mut c,
                "transport/link/tls/connect_private_key",
                q(&t.key_file),
            )?;
            set(&mut c, "transport/link/tls/enable_mtls", "true".into())?;
        }
        set(&mut c, "mode", "\"peer\"".into())?;
        set(&mut c, "listen/endpoints", "[]".into())?;
        set(
            &mut c,
            "connect/endpoints",
            serde_json::to_string(&[edge.locators.clone(), cloud.locators.clone()].concat())?,
        )?;
        set(&mut c, "scouting/multicast/enabled", "false".into())?;
        let gateway = zenoh::open(c)
            .await
            .map_err(|e| anyhow::anyhow!("gateway session: {e}"))?;
        Ok(Rig {
            _dir: dir,
            cloud,
            edge,
            gateway,
            site_key,
        })
    }

    /// A gRPC channel to the cloud node (TLS when the rig is).
    pub(crate) async fn cloud_channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let addr = self.cloud.grpc_addr.expect("grpc");
        match &self.cloud.config.tls {
            Some(t) => {
                crate::ctl::connect_tls(
                    &format!("https://{addr}"),
                    Duration::from_secs(30),
                    Some(&t.ca_file),
                )
                .await
            }
            None => {
                crate::ctl::connect_tls(&format!("http://{addr}"), Duration::from_secs(30), None)
                    .await
            }
        }
    }

    /// Registers `n` twins of `bench` and waits until each answers.
    pub(crate) async fn twins(&self, n: usize, kind: &str) -> anyhow::Result<Vec<String>> {
        let ids: Vec<String> = (1..=n).map(|i| format!("bench/twin-{i:03}")).collect();
        for id in &ids {
            let req = PlacementRequest {
                twin_id: id.clone(),
                kind: kind.into(),
                gateway: "bench".into(),
                chain: None,
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let replies = self
                    .gateway
                    .get(format!("twinmesh/placement/{id}"))
                    .payload(req.encode_to_vec())
                    .encoding(Encoding::from(encoding::PLACEMENT_REQUEST))
                    .timeout(Duration::from_secs(2))
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let placed = match replies.recv_async().await {
                    Ok(r) => r
                        .result()
                        .ok()
                        .and_then(|s| Placement::decode(&*s.payload().to_bytes()).ok())
                        .is_some_and(|p| p.status == "active"),
                    Err(_) => false,
                };
                if placed {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "twin {id} was not placed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let mut client = TwinServiceClient::new(self.cloud_channel().await?);
        for id in &ids {
            let deadline = Instant::now() + Duration::from_secs(30);
            while client
                .get_twin(GetTwinRequest {
                    twin_id: id.clone(),
                })
                .await
                .is_err()
            {
                anyhow::ensure!(Instant::now() < deadline, "twin {id} did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(ids)
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.gateway.close().await;
        self.edge.stop().await?;
        self.cloud.stop().await
    }
}

pub(crate) fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    format!("{cpus} cpus, {model}")
}

#[derive(Debug, Serialize)]
pub(crate) struct IngestReport {
    machine: String,
    twins: usize,
    frame_samples: usize,
    window_frames: u64,
    seconds: f64,
    end_to_end_samples_per_s: f64,
    end_to_end_frames_per_s: f64,
    ack_latency_p50_ms: f64,
    ack_latency_p99_ms: f64,
    raw_zenoh_msgs_per_s: f64,
    raw_zenoh_samples_per_s: f64,
    ratio_to_raw: f64,
    edge_store_bytes: u64,
    stored_bytes_per_sample: f64,
}

/// Resolution of the bench samples (counts × 0.001).
const SAMPLE_SCALE: f64 = 0.001;

/// Deterministic, vibration-like 16-bit ADC samples.
fn samples(n: usize, seed: u64) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let t = (seed as usize * n + i) as f64;
            twinmesh_twins::dsp::codec::quantize(
                (t * 0.05).sin() * 12.0 + (t * 0.31).sin() * 3.0,
                SAMPLE_SCALE,
            )
        })
        .collect()
}

async fn bench_ingest(args: &BenchArgs, scheme: &str) -> anyhow::Result<IngestReport> {
    let rig = Rig::start_with(scheme, args.lease_ms).await?;
    let ids = rig.twins(args.parallel, "wind_turbine").await?;
    let measure = Duration::from_secs_f64(args.seconds);
    let warmup = Duration::from_secs(2);

    let period = 40_000; // 25 kHz
                         // Raw ceiling first, on an idle mesh: the same frames, same two sessions (gateway →
                         // edge node's session).
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    let _raw = rig
        .edge
        .fabric
        .session()
        .declare_subscriber("bench/raw/**")
        .callback(move |_| {
            r.fetch_add(1, Relaxed);
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let payload = TelemetryFrame {
        sealed: Vec::new(),
        twin_id: ids[0].clone(),
        signal: "bearing_vibration".into(),
        seq: 1,
        start_ns: 0,
        sample_period_ns: period,
        samples: samples(args.frame_samples, 7),
        spool_base_seq: 1,
        scale: SAMPLE_SCALE,
        packed: Vec::new(),
    }
    .encode_to_vec();
    let payload = bytes::Bytes::from(payload);
    let raw_pub = rig
        .gateway
        .declare_publisher("bench/raw/frames")
        .congestion_control(CongestionControl::Block)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let raw_start = Instant::now();
    let raw_until = raw_start + measure.min(Duration::from_secs(5));
    let mut sent = 0u64;
    while Instant::now() < raw_until {
        for _ in 0..64 {
            raw_pub
                .put(ZBytes::from(payload.clone()))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            sent += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while received.load(Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let raw_msgs = received.load(Relaxed) as f64 / raw_start.elapsed().as_secs_f64();
    drop(raw_pub);

    // Acks from the twins (durable frames), per twin.
    let acked: Arc<HashMap<String, (AtomicU64, Notify)>> = Arc::new(
        ids.iter()
            .map(|id| (id.clone(), (AtomicU64::new(0), Notify::new())))
            .collect(),
    );
    let a = acked.clone();
    let _acks = rig
        .gateway
        .declare_subscriber("twinmesh/acks/bench/*")
        .callback(move |s| {
            if let Ok(wm) = Watermark::decode(&*s.payload().to_bytes()) {
                if let Some((seq, notify)) = a.get(&wm.twin_id) {
                    seq.fetch_max(wm.seq, Relaxed);
                    notify.notify_waiters();
                }
            }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let start = Instant::now();
    let stop_at = start + warmup + measure;
    let latencies = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new(3)?));
    let mut tasks = Vec::new();
    for id in ids.clone() {
        let publisher = rig
            .gateway
            .declare_publisher(format!("twinmesh/telemetry/{id}/bearing_vibration"))
            .encoding(Encoding::from(encoding::TELEMETRY_FRAME))
            .congestion_control(CongestionControl::Block)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let acked = acked.clone();
        let latencies = latencies.clone();
        let n = args.frame_samples;
        let window = args.window;
        tasks.push(tokio::spawn(async move {
            let body = samples(n, 7);
            let mut seq = 0u64;
            let mut sent_at: std::collections::VecDeque<(u64, Instant)> = Default::default();
            let (ack, notify) = &acked[&id];
            while Instant::now() < stop_at {
                // Stay within the window of unacknowledged frames, like a gateway spool.
                while seq - ack.load(Relaxed) >= window {
                    let wait = notify.notified();
                    if seq - ack.load(Relaxed) < window {
                        break;
                    }
                    if tokio::time::timeout(Duration::from_secs(5), wait)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let acked_now = ack.load(Relaxed);
                while sent_at.front().is_some_and(|(s, _)| *s <= acked_now) {
                    let (_, t) = sent_at.pop_front().expect("front");
                    let _ = latencies
                        .lock()
                        .expect("hist")
                        .record(t.elapsed().as_micros() as u64);
                }
                seq += 1;
                let frame = TelemetryFrame {
                    sealed: Vec::new(),
                    twin_id: id.clone(),
                    signal: "bearing_vibration".into(),
                    seq,
                    start_ns: 1_700_000_000_000_000_000 + (seq as i64) * n as i64 * period,
                    sample_period_ns: period,
                    samples: body.clone(),
                    spool_base_seq: 1,
                    scale: SAMPLE_SCALE,
                    packed: Vec::new(),
                };
                sent_at.push_back((seq, Instant::now()));
                if publisher.put(frame.encode_to_vec()).await.is_err() {
                    return;
                }
            }
        }));
    }
    tokio::time::sleep_until((start + warmup).into()).await;
    let base: u64 = acked.values().map(|(a, _)| a.load(Relaxed)).sum();
    latencies.lock().expect("hist").reset();
    tokio::time::sleep_until(stop_at.into()).await;
    let frames: u64 = acked.values().map(|(a, _)| a.load(Relaxed)).sum::<u64>() - base;
    for t in tasks {
        let _ = t.await;
    }
    let secs = measure.as_secs_f64();
    let e2e_frames = frames as f64 / secs;
    let (p50, p99) = {
        let h = latencies.lock().expect("hist");
        (
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
        )
    };
    // Let the twins drain, then read the store size.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let store_bytes = rig.edge.store.size_on_disk();
    let stored_samples: u64 =
        acked.values().map(|(a, _)| a.load(Relaxed)).sum::<u64>() * args.frame_samples as u64;

    rig.stop().await?;

    let e2e_samples = e2e_frames * args.frame_samples as f64;
    let raw_samples = raw_msgs * args.frame_samples as f64;
    Ok(IngestReport {
        machine: machine(),
        twins: ids.len(),
        frame_samples: args.frame_samples,
        window_frames: args.window,
        seconds: secs,
        end_to_end_samples_per_s: e2e_samples,
        end_to_end_frames_per_s: e2e_frames,
        ack_latency_p50_ms: p50,
        ack_latency_p99_ms: p99,
        raw_zenoh_msgs_per_s: raw_msgs,
        raw_zenoh_samples_per_s: raw_samples,
        ratio_to_raw: if raw_samples > 0.0 {
            e2e_samples / raw_samples
        } else {
            0.0
        },
        edge_store_bytes: store_bytes,
        stored_bytes_per_sample: store_bytes as f64 / stored_samples.max(1) as f64,
    })
}

#[derive(Debug, Serialize)]
struct RpcReport {
    machine: String,
    callers: usize,
    seconds: f64,
    calls: u64,
    calls_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

async fn bench_rpc(args: &BenchArgs) -> anyhow::Result<RpcReport> {
    let rig = Rig::start().await?;
    let ids = rig.twins(1, "wind_turbine").await?;
    let endpoint = format!("http://{}", rig.cloud.grpc_addr.expect("grpc"));
    let channel = tonic::transport::Channel::from_shared(endpoint)?
        .connect()
        .await?;
    let warmup = Duration::from_secs(1);
    let measure = Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.parallel.max(1) {
        let mut client = TwinServiceClient::new(channel.clone());
        let id = ids[0].clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let mut calls = 0u64;
            loop {
                let t = Instant::now();
                if t >= start + warmup + measure {
                    break;
                }
                let ok = client
                    .get_twin(GetTwinRequest {
                        twin_id: id.clone(),
                    })
                    .await
                    .is_ok();
                if ok && t >= start + warmup {
                    let _ = hist.record(t.elapsed().as_micros() as u64);
                    calls += 1;
                }
            }
            (hist, calls)
        }));
    }
    let mut hist = Histogram::<u64>::new(3)?;
    let mut calls = 0;
    for t in tasks {
        let (h, c) = t.await?;
        hist.add(&h)?;
        calls += c;
    }
    rig.stop().await?;
    Ok(RpcReport {
        machine: machine(),
        callers: args.parallel.max(1),
        seconds: measure.as_secs_f64(),
        calls,
        calls_per_s: calls as f64 / measure.as_secs_f64(),
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        max_ms: hist.max() as f64 / 1000.0,
    })
}

#[derive(Debug, Serialize)]
struct DspReport {
    machine: String,
    fft_1024_samples_per_s: f64,
    psd_1024_samples_per_s: f64,
    psd_ratio_to_fft: f64,
    envelope_10000_samples_per_s: f64,
    sosfilt_order8_samples_per_s: f64,
    codec_ratio: f64,
    codec_bytes_per_sample: f64,
    codec_encode_mb_per_s: f64,
    codec_decode_mb_per_s: f64,
    /// The same vibration re-digitised to use the full 16-bit range (harder to pack).
    codec_full_scale_ratio: f64,
    codec_full_scale_encode_mb_per_s: f64,
}

/// Calls `f` (which processes `samples` samples) for at least `secs`; samples/s.
fn rate(secs: f64, samples: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: plans, buffers
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        f();
        n += 1;
    }
    n as f64 * samples as f64 / start.elapsed().as_secs_f64()
}

fn bench_dsp(args: &BenchArgs) -> anyhow::Result<DspReport> {
    use rustfft::num_complex::Complex64;
    use twinmesh_twins::dsp::{self, codec, BandType, Spectral};
    let secs = (args.seconds / 6.0).clamp(0.5, 10.0);
    // One minute of simulated 10 kHz bearing vibration, on its 16-bit grid.
    let id: twinmesh_twins::TwinId = "bench/wt-01".parse()?;
    let mut device = twinmesh_sim::SimDevice::new(id, twinmesh_twins::AssetKind::WindTurbine, 1);
    let spec = twinmesh_twins::AssetKind::WindTurbine
        .schema()
        .signal("bearing_vibration")?;
    let x: Vec<f64> = twinmesh_sim::generate(
        &mut device,
        &["bearing_vibration"],
        spec.rate_hz,
        1_767_225_600_000_000_000,
        600_000,
    )
    .into_iter()
    .map(|r| r[0])
    .collect();

    let fft = rustfft::FftPlanner::<f64>::new().plan_fft_forward(1024);
    let mut buf: Vec<Complex64> = x[..1024].iter().map(|&v| Complex64::new(v, 0.0)).collect();
    let mut scratch = vec![Complex64::default(); fft.get_inplace_scratch_len()];
    let fft_rate = rate(secs, 1024, || {
        fft.process_with_scratch(&mut buf, &mut scratch)
    });

    let mut sp = Spectral::new();
    let window = &x[..65_536];
    let mut psd = Vec::new();
    let psd_rate = rate(secs, window.len(), || {
        sp.welch_into(window, 10_000.0, 1024, &mut psd)
            .expect("psd");
    });
    let mut env = Vec::new();
    let env_rate = rate(secs, 10_000, || {
        sp.envelope_into(&x[..10_000], &mut env).expect("envelope")
    });
    let sos = dsp::butter(8, &[2000.0, 4000.0], BandType::Bandpass, 10_000.0)?;
    let mut filter = dsp::SosFilter::new(sos);
    let mut block = x[..65_536].to_vec();
    let filt_rate = rate(secs, block.len(), || filter.process(&mut block));

    let frames: Vec<&[f64]> = x.chunks(1024).collect();
    let mut packed = Vec::with_capacity(16 * 1024);
    let mut total = 0usize;
    for f in &frames {
        packed.clear();
        codec::encode(f, spec.resolution, &mut packed);
        total += packed.len();
    }
    let raw = x.len() * 8;
    let enc_rate = rate(secs, x.len(), || {
        for f in &frames {
            packed.clear();
            codec::encode(f, spec.resolution, &mut packed);
        }
    });
    let encoded: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| {
            let mut p = Vec::new();
            codec::encode(f, spec.resolution, &mut p);
            p
        })
        .collect();
    let mut out = Vec::with_capacity(1024);
    let dec_rate = rate(secs, x.len(), || {
        for e in &encoded {
            out.clear();
            codec::decode(e, &mut out).expect("decode");
        }
    });
    // Full scale: the largest sample at ±32767 counts.
    let peak = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let fs_scale = peak / 32767.0;
    let full: Vec<f64> = x.iter().map(|&v| codec::quantize(v, fs_scale)).collect();
    let full_frames: Vec<&[f64]> = full.chunks(1024).collect();
    let mut full_total = 0usize;
    for f in &full_frames {
        packed.clear();
        codec::encode(f, fs_scale, &mut packed);
        full_total += packed.len();
    }
    let full_enc_rate = rate(secs, full.len(), || {
        for f in &full_frames {
            packed.clear();
            codec::encode(f, fs_scale, &mut packed);
        }
    });
    Ok(DspReport {
        machine: machine(),
        codec_full_scale_ratio: raw as f64 / full_total as f64,
        codec_full_scale_encode_mb_per_s: full_enc_rate * 8.0 / 1e6,
        fft_1024_samples_per_s: fft_rate,
        psd_1024_samples_per_s: psd_rate,
        psd_ratio_to_fft: psd_rate / fft_rate,
        envelope_10000_samples_per_s: env_rate,
        sosfilt_order8_samples_per_s: filt_rate,
        codec_ratio: raw as f64 / total as f64,
        codec_bytes_per_sample: total as f64 / x.len() as f64,
        codec_encode_mb_per_s: enc_rate * 8.0 / 1e6,
        codec_decode_mb_per_s: dec_rate * 8.0 / 1e6,
    })
}

#[derive(Debug, Serialize)]
struct MoveReport {
    machine: String,
    runs: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    lease_ms: u64,
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99), *v.last().unwrap_or(&0.0))
}

/// A cloud, two edges of one site and a gateway streaming one wind turbine, in-process.
async fn movement_rig(dir: &std::path::Path) -> anyhow::Result<Vec<RunningNode>> {
    let mut nodes: Vec<RunningNode> = Vec::new();
    let plan = [
        ("bench-cloud", Tier::Cloud, CLOUD_SITE),
        ("bench-edge-1", Tier::Edge, "bench"),
        ("bench-edge-2", Tier::Edge, "bench"),
        ("bench-iot", Tier::Iot, "bench"),
    ];
    for (id, tier, site) in plan {
        let mut cfg = NodeConfig::new(id.parse()?, tier, site);
        cfg.listen = vec!["tcp/127.0.0.1:0".into()];
        cfg.connect = nodes.iter().flat_map(|n| n.locators.clone()).collect();
        cfg.grpc = (tier == Tier::Cloud)
            .then(|| "127.0.0.1:0".parse())
            .transpose()?;
        cfg.data = dir.join(id);
        if tier == Tier::Iot {
            cfg.simulate = vec!["wind_turbine:1"
                .parse()
                .map_err(|e: String| anyhow::anyhow!(e))?];
        }
        cfg.normalize()?;
        nodes.push(RunningNode::start(cfg).await?);
    }
    Ok(nodes)
}

async fn bench_migrate(args: &BenchArgs) -> anyhow::Result<MoveReport> {
    use twinmesh_proto::v1::mesh_service_client::MeshServiceClient;
    use twinmesh_twins::proto::MigrateTwinRequest;
    let dir = tempfile::tempdir()?;
    let nodes = movement_rig(dir.path()).await?;
    let endpoint = format!("http://{}", nodes[0].grpc_addr.expect("grpc"));
    let mut twins = TwinServiceClient::connect(endpoint.clone()).await?;
    let mut mesh = MeshServiceClient::connect(endpoint).await?;
    let id = "bench/wt-01".to_owned();
    // Streaming first.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(t) = twins
            .get_twin(GetTwinRequest {
                twin_id: id.clone(),
            })
            .await
        {
            if t.get_ref()
                .reported
                .get("bearing_vibration")
                .is_some_and(|v| v.seq > 10)
            {
                break;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the twin did not start streaming"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let runs = (args.parallel * 5).clamp(5, 200);
    let mut durations = Vec::new();
    for i in 0..runs {
        let target = if i % 2 == 0 {
            "bench-edge-2"
        } else {
            "bench-edge-1"
        };
        let current = twins
            .get_twin(GetTwinRequest {
                twin_id: id.clone(),
            })
            .await?
            .into_inner();
        let target = if current.placement.as_ref().is_some_and(|p| p.node == target) {
            if target == "bench-edge-1" {
                "bench-edge-2"
            } else {
                "bench-edge-1"
            }
        } else {
            target
        };
        let r = mesh
            .migrate_twin(MigrateTwinRequest {
                twin_id: id.clone(),
                target_node: target.into(),
                target_tier: String::new(),
            })
            .await?
            .into_inner();
        durations.push(r.duration_ns as f64 / 1e6);
        // Let ingestion settle on the new node between moves.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for n in nodes.into_iter().rev() {
        n.stop().await?;
    }
    let (p50, p99, max) = percentiles(durations);
    Ok(MoveReport {
        machine: machine(),
        runs,
        p50_ms: p50,
        p99_ms: p99,
        max_ms: max,
        lease_ms: 2000,
    })
}

/// Separate `twinmesh node` processes, so a node can really be `kill -9`ed.
async fn bench_failover(args: &BenchArgs) -> anyhow::Result<MoveReport> {
    use std::process::Stdio;
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let lease_ms = 2000u64;
    struct Proc {
        child: tokio::process::Child,
        args: Vec<String>,
        zenoh: String,
        grpc: String,
    }
    async fn spawn(exe: &std::path::Path, args: Vec<String>) -> anyhow::Result<Proc> {
        let mut child = tokio::process::Command::new(exe)
            .arg("node")
            .args(&args)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await??
            .ok_or_else(|| anyhow::anyhow!("node exited before it was ready"))?;
        let field = |k: &str| {
            line.split(' ')
                .find_map(|f| f.strip_prefix(k))
                .map(|v| v.split(',').next().unwrap_or_default().to_owned())
                .unwrap_or_default()
        };
        Ok(Proc {
            zenoh: field("zenoh="),
            grpc: field("grpc="),
            child,
            args,
        })
    }
    let base = |tier: &str, id: &str, site: &str, connect: &[String]| {
        let mut a: Vec<String> = [
            "--tier",
            tier,
            "--id",
            id,
            "--listen",
            "tcp/127.0.0.1:0",
            "--lease-ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(lease_ms.to_string());
        a.extend([
            "--data".to_owned(),
            dir.path().join(id).display().to_string(),
        ]);
        if !site.is_empty() {
            a.extend(["--site".to_owned(), site.to_owned()]);
        }
        for c in connect {
            a.extend(["--connect".to_owned(), c.clone()]);
        }
        a
    };
    let mut cloud_args = base("cloud", "cloud", "", &[]);
    cloud_args.extend(["--grpc".to_owned(), "127.0.0.1:0".to_owned()]);
    let cloud = spawn(&exe, cloud_args).await?;
    let mut edges = Vec::new();
    for id in ["edge-1", "edge-2"] {
        edges.push(
            spawn(
                &exe,
                base("edge", id, "bench", std::slice::from_ref(&cloud.zenoh)),
            )
            .await?,
        );
    }
    let mut iot_args = base(
        "iot",
        "iot",
        "bench",
        &[
            edges[0].zenoh.clone(),
            edges[1].zenoh.clone(),
            cloud.zenoh.clone(),
        ],
    );
    iot_args.extend(["--simulate".to_owned(), "power_meter:1".to_owned()]);
    let _iot = spawn(&exe, iot_args).await?;
    let endpoint = format!("http://{}", cloud.grpc);
    let mut twins = TwinServiceClient::connect(endpoint).await?;
    let id = "bench/pm-01".to_owned();
    let node_of = |t: &twinmesh_twins::proto::Twin| {
        t.placement
            .as_ref()
            .map(|p| p.node.clone())
            .unwrap_or_default()
    };
    let mut times = Vec::new();
    let runs = args.parallel.clamp(1, 20);
    for _ in 0..runs {
        let deadline = Instant::now() + Duration::from_secs(30);
        let home = loop {
            if let Ok(t) = twins
                .get_twin(GetTwinRequest {
                    twin_id: id.clone(),
                })
                .await
            {
                let n = node_of(t.get_ref());
                if !n.is_empty() && t.get_ref().reported.contains_key("voltage") {
                    break n;
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "the twin did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let victim = if home == "edge-1" { 0 } else { 1 };
        edges[victim].child.start_kill()?;
        let killed = Instant::now();
        let _ = edges[victim].child.wait().await;
        loop {
            if let Ok(t) = twins
                .get_twin(GetTwinRequest {
                    twin_id: id.clone(),
                })
                .await
            {
                let n = node_of(t.get_ref());
                if !n.is_empty() && n != home {
                    break;
                }
            }
            anyhow::ensure!(
                killed.elapsed() < Duration::from_secs(30),
                "no failover within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(killed.elapsed().as_secs_f64() * 1e3);
        // Bring the killed edge back on its port and data.
        let mut again = edges[victim].args.clone();
        let i = again.iter().position(|a| a == "--listen").expect("listen");
        again[i + 1] = edges[victim].zenoh.clone();
        edges[victim] = spawn(&exe, again).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (p50, p99, max) = percentiles(times);
    Ok(MoveReport {
        machine: machine(),
        runs,
        p50_ms: p50,
        p99_ms: p99,
        max_ms: max,
        lease_ms,
    })
}

/// Resident memory of this process, bytes.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The twin ids of `bench scale`: kinds in turn, `{prefix}-{n}` on the site `bench`.
pub(crate) fn scale_placement(prefix: &str, i: usize, node: &str) -> Placement {
    let kind = twinmesh_twins::AssetKind::ALL[i % twinmesh_twins::AssetKind::ALL.len()];
    Placement {
        twin_id: format!("bench/{prefix}{}-{i:07}", kind.prefix()),
        node: node.into(),
        tier: Tier::Edge.to_string(),
        epoch: 1,
        kind: kind.to_string(),
        site: "bench".into(),
        status: twinmesh_actors::mesh::STATUS_ACTIVE.into(),
        reason: String::new(),
        initial_chain: None,
    }
}

pub(crate) const SCALE_NODE: &str = "bench-edge";

pub(crate) fn scale_node_config(data: &std::path::Path) -> anyhow::Result<NodeConfig> {
    let mut cfg = NodeConfig::new(SCALE_NODE.parse()?, Tier::Edge, "bench");
    cfg.listen = vec!["tcp/127.0.0.1:0".into()];
    cfg.data = data.to_path_buf();
    cfg.cache_mb = 64;
    Ok(cfg)
}

/// Polls `count` every 100 ms until it reaches `total` or `bound` passes; prints
/// progress every 5 s.
pub(crate) async fn wait_for(
    what: &str,
    total: usize,
    bound: Duration,
    mut count: impl FnMut() -> usize,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let n = count();
        if n >= total {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < bound,
            "{what}: {n} of {total} after {bound:?}"
        );
        if last_print.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "  {what}: {n} of {total} ({:.0} s)",
                start.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Debug, Serialize, serde::Deserialize)]
struct LivePhase {
    twins: usize,
    node_rss_bytes: u64,
    live_rss_bytes: u64,
    bytes_per_live_twin: f64,
    start_seconds: f64,
    stop_seconds: f64,
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
    let supervisor = node.supervisor.clone().expect("edge supervisor");
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
    let store = crate::store::SledStore::open(data, 64)?;
    for i in 0..args.registered {
        let mut p = scale_placement("r", i, SCALE_NODE);
        p.status = twinmesh_actors::node::STATUS_DORMANT.into();
        store.save_hosted(&p)?;
    }
    futures::executor::block_on(store.flush())?;
    Ok(start.elapsed().as_secs_f64())
}

#[derive(Debug, Serialize, serde::Deserialize)]
struct RegisteredPhase {
    registered: usize,
    /// Time the seed phase took to write the records (filled in by the parent).
    #[serde(default)]
    seed_seconds: f64,
    process_rss_bytes: u64,
    loaded_rss_bytes: u64,
    bytes_per_registered_twin: f64,
    load_seconds: f64,
    woken: usize,
    wake_p50_ms: f64,
    wake_p99_ms: f64,
    wake_max_ms: f64,
    after_wake_rss_bytes: u64,
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
struct ScaleReport {
    machine: String,
    live: LivePhase,
    registered: RegisteredPhase,
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

async fn bench_scale(args: &BenchArgs) -> anyhow::Result<Option<ScaleReport>> {
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
                < crate::config::NodeConfig::new("x".parse()?, Tier::Edge, "x").max_frame_bytes,
        "--frame-samples must fit a frame under the 1 MiB limit"
    );
    let queue = twinmesh_actors::context::TwinConfig::default().ingest_queue as u64;
    anyhow::ensure!(
        args.window > 0 && args.window <= queue,
        "--window must be in 1..={queue} (a twin's ingest queue): this publisher does not re-send frames a full queue drops, as the gateway does"
    );
    match args.kind {
        BenchKind::Scored => {
            anyhow::ensure!(
                (1..=200_000).contains(&args.twins),
                "--twins must be in 1..=200000"
            );
            let r = crate::bench_models::bench_scored(args.twins, args.seconds, machine()).await?;
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
            let r = tokio::task::spawn_blocking(move || {
                crate::bench_models::bench_models(rows, machine())
            })
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
            let r = crate::bench_privacy::bench_privacy(twins, machine()).await?;
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
            }
        }
    }
    Ok(())
}
