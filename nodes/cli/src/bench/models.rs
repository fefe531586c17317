//! `twinmesh bench models`: what anomaly models cost (BENCHMARKS.md) — training time on
//! `--rows` feature vectors, and scoring cost per window (the twin's
//! [`Monitor::assess`]: score, status, drift tracking) per algorithm, on one core.
//!
//! The data are synthetic: 24 features driven by 4 latent factors plus noise (a shape
//! like a machine's correlated features), seeded, so runs compare.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use ndarray::Array2;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::Serialize;

use twinmesh_twins::model::{Algorithm, Model, TrainParams};
use twinmesh_twins::monitor::{Monitor, MonitorConfig};

const FEATURES: usize = 24;
const FACTORS: usize = 4;
/// Windows scored per algorithm.
const SCORED: usize = 200_000;
const ONNX_FIXTURE: &[u8] = include_bytes!("../../../../twins/tests/fixtures/pca_autoencoder.onnx");

#[derive(Debug, Serialize)]
pub struct AlgorithmCost {
    pub algorithm: String,
    pub features: usize,
    pub train_rows: usize,
    pub train_seconds: f64,
    pub model_bytes: usize,
    pub score_mean_us: f64,
    pub score_p99_us: f64,
}

#[derive(Debug, Serialize)]
pub struct ModelsReport {
    pub machine: String,
    pub algorithms: Vec<AlgorithmCost>,
}

fn data(rows: usize, seed: u64) -> Array2<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = Normal::new(0.0, 1.0).expect("normal");
    let loadings: Vec<[f64; FACTORS]> = (0..FEATURES)
        .map(|_| std::array::from_fn(|_| n.sample(&mut rng)))
        .collect();
    let mut out = Array2::zeros((rows, FEATURES));
    for mut row in out.rows_mut() {
        let f: [f64; FACTORS] = std::array::from_fn(|_| n.sample(&mut rng));
        for (j, v) in row.iter_mut().enumerate() {
            let l = &loadings[j];
            *v = 10.0 + (0..FACTORS).map(|k| l[k] * f[k]).sum::<f64>() + 0.3 * n.sample(&mut rng);
        }
    }
    out
}

fn scoring(model: Model, rows: &Array2<f64>) -> (f64, f64) {
    let mut m = Monitor::new(Arc::new(model), MonitorConfig::default());
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    let start = Instant::now();
    for r in rows.rows() {
        let x = r.as_slice().expect("row");
        let t = Instant::now();
        std::hint::black_box(m.assess(x));
        let _ = hist.record(t.elapsed().as_nanos() as u64);
    }
    let mean_us = start.elapsed().as_secs_f64() * 1e6 / rows.nrows() as f64;
    (mean_us, hist.value_at_quantile(0.99) as f64 / 1e3)
}

pub fn bench_models(train_rows: usize, machine: String) -> anyhow::Result<ModelsReport> {
    let names: Vec<String> = (0..FEATURES).map(|j| format!("signal.f{j:02}")).collect();
    let train = data(train_rows, 1);
    let probe = data(SCORED, 2);
    let mut out = Vec::new();
    for alg in [
        Algorithm::Pca,
        Algorithm::PcaNormal,
        Algorithm::Ensemble,
        Algorithm::Robust,
        Algorithm::IsolationForest,
    ] {
        eprintln!("training {alg} on {train_rows} rows");
        let t = Instant::now();
        let model = Model::train(&names, train.view(), &TrainParams::for_algorithm(alg))?;
        let train_seconds = t.elapsed().as_secs_f64();
        let model_bytes = model.to_bytes().len();
        let (score_mean_us, score_p99_us) = scoring(model, &probe);
        out.push(AlgorithmCost {
            algorithm: alg.to_string(),
            features: FEATURES,
            train_rows,
            train_seconds,
            model_bytes,
            score_mean_us,
            score_p99_us,
        });
    }
    // The ONNX fixture (4 features, tract).
    let onnx_names: Vec<String> = (0..4).map(|j| format!("signal.f{j:02}")).collect();
    let model = Model::from_onnx(&onnx_names, ONNX_FIXTURE, "score", false, 1.0)?;
    let model_bytes = model.to_bytes().len();
    let probe4 = probe.slice(ndarray::s![.., ..4]).to_owned();
    let (score_mean_us, score_p99_us) = scoring(model, &probe4);
    out.push(AlgorithmCost {
        algorithm: "onnx (fixture: standardise + 2-component PCA autoencoder, tract)".into(),
        features: 4,
        train_rows: 0,
        train_seconds: 0.0,
        model_bytes,
        score_mean_us,
        score_p99_us,
    });
    Ok(ModelsReport {
        machine,
        algorithms: out,
    })
}

/// `bench scored`: twins scoring one window per second each on one edge node.
#[derive(Debug, Serialize)]
pub struct ScoredReport {
    pub machine: String,
    pub twins: usize,
    pub seconds: f64,
    pub offered_windows_per_s: f64,
    pub scored_windows_per_s: f64,
    /// CPU time of the whole process (node, twins, frame publisher) over wall time.
    pub cores_used: f64,
    pub features: usize,
}

/// The features of `chain`'s windows over random data, and rows to train on.
fn training_rows(chain: &twinmesh_twins::chain::Chain, signal: &str) -> (Vec<String>, Array2<f64>) {
    use twinmesh_twins::chain::{run_window, Analyzer, Block};
    use twinmesh_twins::monitor::FeatureVector;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let n = Normal::new(0.0, 1.0).expect("normal");
    let mut analyzer = Analyzer::new(chain);
    let mut windows = Vec::new();
    for i in 0..2000i64 {
        let block = Block {
            start_ns: i * 1_000_000_000,
            period_ns: 500_000_000,
            samples: (0..2).map(|_| 800.0 + 50.0 * n.sample(&mut rng)).collect(),
        };
        for job in analyzer.push(signal, block) {
            windows.push(run_window(&job));
        }
    }
    let mut names: Vec<String> = windows.iter().flat_map(|w| w.keys().cloned()).collect();
    names.sort();
    names.dedup();
    let mut v = FeatureVector::new(&names);
    let rows: Vec<Vec<f64>> = windows.iter().filter_map(|w| v.update(w)).collect();
    let x = Array2::from_shape_fn((rows.len(), names.len()), |(i, j)| rows[i][j]);
    (names, x)
}

fn cpu_seconds() -> f64 {
    // utime and stime, fields 14 and 15 of /proc/self/stat, in clock ticks (100 Hz).
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

pub async fn bench_scored(
    twins: usize,
    seconds: f64,
    machine: String,
) -> anyhow::Result<ScoredReport> {
    use bytes::Bytes;
    use prost::Message;
    use std::time::Duration;
    use twinmesh_actors::metrics::NodeMetrics;
    use twinmesh_actors::node::NodeMsg;
    use twinmesh_actors::ports::Qos;
    use twinmesh_twins::chain::{Chain, ChainSpec, ParamValue, StageSpec};
    use twinmesh_twins::proto::{twin_request, InstallModelRequest, TelemetryFrame, TwinRequest};
    use twinmesh_twins::{keys, AssetKind, TwinId};

    let kind = AssetKind::HpcNode;
    let signal = "power";
    // One 2-sample window per frame, one frame per second per twin.
    let spec = ChainSpec {
        stage: vec![StageSpec {
            op: "stats".into(),
            tier: "edge".into(),
            signal: Some(signal.into()),
            params: [("window_s".to_owned(), ParamValue::Number(2.0))]
                .into_iter()
                .collect(),
        }],
    };
    let chain = Chain::validate(&spec, kind)?;
    let (names, rows) = training_rows(&chain, signal);
    // The default algorithm: what a twin trained without one named runs.
    let model = Model::train(&names, rows.view(), &TrainParams::default())?;
    let model_bytes = model.to_bytes();

    let dir = tempfile::tempdir()?;
    let mut cfg = super::rig::scale_node_config(dir.path())?;
    cfg.normalize()?;
    let node = twinmesh_nodes::RunningNode::start(cfg).await?;
    let ctx = node.ctx.clone();
    let supervisor = node.supervisor().expect("edge supervisor");
    let ids: Vec<TwinId> = (0..twins)
        .map(|i| format!("bench/hpc-{i:07}").parse())
        .collect::<Result<_, _>>()?;
    for id in &ids {
        supervisor.cast(NodeMsg::Place(twinmesh_twins::proto::Placement {
            twin_id: id.to_string(),
            kind: kind.to_string(),
            initial_chain: Some((&spec).into()),
            ..super::rig::scale_placement("", 0, super::rig::SCALE_NODE)
        }))?;
    }
    super::rig::wait_for("twins started", twins, Duration::from_secs(600), || {
        ctx.directory.len()
    })
    .await?;
    // Install the model on every twin, a few calls at a time.
    let installed = futures::stream::iter(ids.iter().cloned())
        .map(|id| {
            let ctx = ctx.clone();
            let model = model_bytes.clone();
            async move {
                let req = TwinRequest {
                    caller: None,
                    request: Some(twin_request::Request::InstallModel(InstallModelRequest {
                        twin_id: id.to_string(),
                        model_id: "bench".into(),
                        version: 1,
                        model,
                    })),
                };
                ctx.fabric
                    .query(
                        &keys::twin_rpc(&id),
                        Some((
                            Bytes::from(req.encode_to_vec()),
                            <twinmesh_proto::v1::TwinRequest as twinmesh_proto::Wire>::ENCODING,
                        )),
                        Duration::from_secs(10),
                    )
                    .await
                    .map(|r| !r.is_empty())
                    .unwrap_or(false)
            }
        })
        .buffer_unordered(64)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    anyhow::ensure!(
        installed == twins,
        "model installed on {installed} of {twins} twins"
    );

    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let frames = |seq: u64| {
        let ids = &ids;
        let ctx = &ctx;
        async move {
            for id in ids {
                let mut f = TelemetryFrame {
                    sealed: Vec::new(),
                    twin_id: id.to_string(),
                    signal: signal.into(),
                    seq,
                    start_ns: seq as i64 * 1_000_000_000,
                    sample_period_ns: 500_000_000,
                    samples: vec![800.0 + (seq % 7) as f64, 810.0 - (seq % 5) as f64],
                    spool_base_seq: 1,
                    scale: 0.0,
                    packed: Vec::new(),
                    proof: None,
                };
                ctx.trust.prove(id.site(), &mut f);
                let _ = ctx
                    .fabric
                    .publish(
                        &keys::telemetry(id, signal),
                        Bytes::from(f.encode_to_vec()),
                        <twinmesh_proto::v1::TelemetryFrame as twinmesh_proto::Wire>::ENCODING,
                        Qos::Reliable,
                    )
                    .await;
            }
        }
    };
    // Warm-up: every twin has all its features before the measured period.
    for _ in 0..3 {
        tick.tick().await;
        seq += 1;
        frames(seq).await;
    }
    let scored0 = NodeMetrics::get(&ctx.metrics.windows_scored);
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let rounds = seconds.ceil() as u64;
    for _ in 0..rounds {
        tick.tick().await;
        seq += 1;
        frames(seq).await;
    }
    // Until the last round's windows are scored (bounded: a node that cannot keep up
    // shows as a shortfall, not as a wait).
    let offered = twins as u64 * rounds;
    let deadline = Instant::now() + Duration::from_secs(5);
    while NodeMetrics::get(&ctx.metrics.windows_scored) - scored0 < offered
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = start.elapsed().as_secs_f64();
    let scored = NodeMetrics::get(&ctx.metrics.windows_scored) - scored0;
    let cpu = cpu_seconds() - cpu0;
    node.stop().await?;
    Ok(ScoredReport {
        machine,
        twins,
        seconds: wall,
        offered_windows_per_s: offered as f64 / wall,
        scored_windows_per_s: scored as f64 / wall,
        cores_used: cpu / wall,
        features: names.len(),
    })
}
