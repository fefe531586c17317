//! `twinmesh bench models`: what anomaly models cost (BENCHMARKS.md) — training time on
//! `--rows` feature vectors, and scoring cost per window (the twin's
//! [`Monitor::assess`]: score, status, drift tracking) per algorithm, on one core.
//!
//! The data are synthetic: 24 features driven by 4 latent factors plus noise (a shape
//! like a machine's correlated features), seeded, so runs compare.

use std::sync::Arc;
use std::time::Instant;

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
const ONNX_FIXTURE: &[u8] = include_bytes!("../../twins/tests/fixtures/pca_autoencoder.onnx");

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
