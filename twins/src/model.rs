//! Anomaly models over feature vectors (issue 6, DESIGN §4–5): trained from a feature
//! matrix, an alarm threshold calibrated from the training scores, a versioned and
//! checksummed file format, and scoring of one window. Pure: no I/O, no clock; the seed
//! of the isolation forest comes in as data.
//!
//! - [`Algorithm::Pca`]: features standardised, principal components keeping
//!   `variance` of the variance; score = Hotelling T² in the kept subspace plus the
//!   squared reconstruction error (SPE) over the mean discarded eigenvalue.
//! - [`Algorithm::PcaNormal`]: the same PCA on each feature's normal scores (a Gaussian
//!   copula): a feature is mapped through its training quantiles onto the standard
//!   normal's (128 knots, piecewise linear, extended beyond the training range with the
//!   end segments' slopes). A monotone relation between features becomes a linear one
//!   that PCA can model (a temperature that saturates with the power drawn), and every
//!   feature gets a Gaussian marginal (the log transform's job, for all). Staleness
//!   features stay linear (their growth is what a stuck sensor shows). More sensitive
//!   than PCA to values beyond the training range (EVALUATION.md).
//! - [`Algorithm::Ensemble`] (the default, [`DEFAULT_ALGORITHM`]): PCA and
//!   `pca_normal` trained on the same rows, each calibrated at the 1 − (1 − q)/2
//!   quantile (Bonferroni: the two share the false-alarm budget of one); score = the
//!   larger of their score / threshold ratios, threshold 1. PCA is the quicker of the two
//!   on most faults, `pca_normal` the one that sees values beyond a non-linear relation
//!   (EVALUATION.md).
//! - [`Algorithm::Robust`]: per-feature median and MAD (× 1.4826; the standard
//!   deviation for a feature whose MAD is under a tenth of it, i.e. one that mostly
//!   repeats one value), each feature's scale widened by the 0.99 quantile of its own
//!   training |z| so heavy-tailed features do not set the threshold for all; score = the
//!   largest scaled robust z-score.
//! - [`Algorithm::IsolationForest`]: Liu, Ting & Zhou (2008): `trees` trees on
//!   sub-samples of `sample_size` rows, height limit ⌈log₂ sample_size⌉; score =
//!   2^(−E[h(x)]/c(sample_size)) in (0, 1].
//!
//! Every model explains a score: [`Model::contributions`] gives each feature's share.
//!
//! Thresholds: the `quantile` of the training scores ([`DEFAULT_QUANTILE`], 0.9999, for
//! PCA and the robust baseline: one healthy window in 10,000). A quantile that fewer than
//! ten training rows lie above is extrapolated from the tail of the training scores
//! (peaks over threshold, a generalised Pareto fit), not read off the few largest rows.
//! `pca_normal` calibrates on cross-fitted scores (each of five consecutive blocks of
//! the training rows scored by a model of the other four): its quantile maps bound the
//! normal scores of the rows they were fitted to, so in-sample scores understate the
//! tail that new days show.
//!
//! What each sees (tested below): PCA catches broken correlations whose values are each
//! in range; the robust baseline catches any single feature far from its median; the
//! isolation forest catches points far out in several features, but a lone excursion
//! among features that did not move can stay under its threshold (each split picks a
//! feature at random), and its score saturates outside the range of its sub-samples
//! (a 6 σ and a 10 σ excursion score alike, barely above the healthy tail), so its
//! threshold needs a lower quantile (0.99).

use ndarray::{Array1, Array2, ArrayView2, Axis};
use rand::seq::index::sample as sample_indices;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Magic bytes and format version of a model file.
const MAGIC: &[u8; 4] = b"TWMM";
pub const FORMAT_VERSION: u32 = 1;

/// Bins of the reference score distribution (deciles).
pub const REFERENCE_BINS: usize = 10;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelError {
    #[error("invalid training data: {0}")]
    InvalidData(String),
    #[error("invalid model parameter: {0}")]
    InvalidParameter(String),
    #[error("feature vector has {got} values, the model expects {expected}")]
    WrongWidth { got: usize, expected: usize },
    #[error("feature {0} is not finite")]
    NotFinite(String),
    #[error("not a twinmesh model file (bad magic bytes)")]
    BadMagic,
    #[error("model file format version {0} is not supported (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("model file is corrupt: checksum mismatch")]
    Checksum,
    #[error("model file is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Model ids name registry entries and Zenoh key chunks: 1–64 of `a-z 0-9 _ -`.
pub fn validate_model_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ModelError::InvalidParameter(format!(
            "model id {id:?}: expected 1 to 64 of a-z, 0-9, '_' and '-'"
        )))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    Pca,
    Robust,
    IsolationForest,
    /// PCA on the features' normal scores (see the module documentation).
    PcaNormal,
    /// PCA and pca_normal together: the larger of their scores over their own
    /// thresholds (see the module documentation).
    Ensemble,
    /// Imported, not trained: an ONNX model ([`crate::onnx`]).
    Onnx,
}

impl Algorithm {
    pub const ALL: [Algorithm; 5] = [
        Algorithm::Pca,
        Algorithm::Robust,
        Algorithm::IsolationForest,
        Algorithm::PcaNormal,
        Algorithm::Ensemble,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Pca => "pca",
            Algorithm::Robust => "robust",
            Algorithm::IsolationForest => "isolation_forest",
            Algorithm::PcaNormal => "pca_normal",
            Algorithm::Ensemble => "ensemble",
            Algorithm::Onnx => "onnx",
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Algorithm {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pca" => Ok(Algorithm::Pca),
            "robust" => Ok(Algorithm::Robust),
            "isolation_forest" | "iforest" => Ok(Algorithm::IsolationForest),
            "pca_normal" => Ok(Algorithm::PcaNormal),
            "ensemble" => Ok(Algorithm::Ensemble),
            "onnx" => Ok(Algorithm::Onnx),
            other => Err(ModelError::InvalidParameter(format!(
                "unknown algorithm {other:?} (pca, robust, isolation_forest, pca_normal, \
                 ensemble)"
            ))),
        }
    }
}

/// How to train a model.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainParams {
    pub algorithm: Algorithm,
    /// The alarm threshold is this quantile of the training scores.
    pub quantile: f64,
    /// PCA: share of the (standardised) variance the kept components explain.
    pub variance: f64,
    /// Isolation forest: number of trees, rows per tree, and the seed.
    pub trees: usize,
    pub sample_size: usize,
    pub seed: u64,
}

/// The algorithm `TrainModel` and `ctl train` use when none is named: PCA and pca_normal
/// together (EVALUATION.md: pca_normal's non-linear relations, PCA's speed on the rest,
/// no more false alarms than either).
pub const DEFAULT_ALGORITHM: Algorithm = Algorithm::Ensemble;

/// The default alarm-threshold quantile (PCA, robust): one healthy window in 10,000
/// above it, beyond what a few thousand training rows resolve, so the tail is
/// extrapolated ([`threshold_at`]).
pub const DEFAULT_QUANTILE: f64 = 0.9999;

impl TrainParams {
    /// The defaults for `algorithm`: the isolation forest's threshold sits at the 0.99
    /// quantile (its score saturates, see the module documentation).
    pub fn for_algorithm(algorithm: Algorithm) -> Self {
        TrainParams {
            algorithm,
            quantile: if algorithm == Algorithm::IsolationForest {
                0.99
            } else {
                DEFAULT_QUANTILE
            },
            ..TrainParams::default()
        }
    }
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            algorithm: DEFAULT_ALGORITHM,
            quantile: DEFAULT_QUANTILE,
            variance: 0.95,
            trees: 100,
            sample_size: 256,
            seed: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Body {
    Pca {
        mean: Vec<f64>,
        scale: Vec<f64>,
        /// Kept components, one row each (unit vectors in standardised space).
        components: Vec<Vec<f64>>,
        eigenvalues: Vec<f64>,
        /// Mean of the discarded eigenvalues (floor: a small share of the total).
        residual_variance: f64,
    },
    Robust {
        median: Vec<f64>,
        mad: Vec<f64>,
    },
    Forest {
        trees: Vec<Tree>,
        sample_size: usize,
    },
    Onnx {
        /// The ONNX model file, base64.
        onnx: String,
        /// Name of the output that holds the score.
        output: String,
        /// Scores are negated (the model's higher means more normal).
        negate: bool,
        /// The compiled plan, looked up once per model value (not per window).
        #[serde(skip)]
        scorer: ScorerCell,
    },
    /// [`Algorithm::Ensemble`]: its members ([`ENSEMBLE_MEMBERS`]), each calibrated.
    Ensemble {
        members: Vec<Model>,
    },
}

/// The algorithms an [`Algorithm::Ensemble`] combines.
pub const ENSEMBLE_MEMBERS: [Algorithm; 2] = [Algorithm::Pca, Algorithm::PcaNormal];

/// A compiled ONNX plan attached to a model; not part of its data (equal, cloned and
/// serialised as if absent).
#[derive(Default)]
struct ScorerCell(std::sync::OnceLock<std::sync::Arc<crate::onnx::OnnxScorer>>);

impl Clone for ScorerCell {
    fn clone(&self) -> Self {
        let cell = ScorerCell::default();
        if let Some(s) = self.0.get() {
            let _ = cell.0.set(s.clone());
        }
        cell
    }
}

impl PartialEq for ScorerCell {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for ScorerCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "compiled"
        } else {
            "not compiled"
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Tree {
    Leaf {
        size: usize,
    },
    Split {
        feature: usize,
        value: f64,
        left: Box<Tree>,
        right: Box<Tree>,
    },
}

/// The calibration of a CUSUM on score / threshold (Page 1954).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sustained {
    /// Ratio subtracted from every window's: the [`SUSTAINED_QUANTILE`] of the training
    /// ratios, so healthy windows drain the sum.
    pub reference: f64,
    /// Sum that raises the alarm: [`SUSTAINED_MARGIN`] times the largest the training
    /// rows reached.
    pub limit: f64,
}

/// Quantile of the training ratios that a window must pass to add to the sustained sum.
pub const SUSTAINED_QUANTILE: f64 = 0.95;
/// The sustained limit over the largest sum the training rows reached.
pub const SUSTAINED_MARGIN: f64 = 2.0;

impl Sustained {
    /// One step of the sum: `sum` after a window of score / threshold `ratio`.
    pub fn step(&self, sum: f64, ratio: f64) -> f64 {
        (sum + ratio.min(SUSTAINED_CAP) - self.reference).max(0.0)
    }

    /// Calibrates on the training scores, `in_order` (as the rows came) and `sorted`,
    /// against the model's `threshold`.
    fn calibrate(in_order: &[f64], sorted: &[f64], threshold: f64) -> Option<Sustained> {
        let reference = quantile(sorted, SUSTAINED_QUANTILE) / threshold;
        if !(reference.is_finite() && reference > 0.0) {
            return None;
        }
        let mut s = Sustained {
            reference,
            limit: f64::INFINITY,
        };
        let mut sum = 0.0f64;
        let mut most = 0.0f64;
        for &score in in_order {
            sum = s.step(sum, score / threshold);
            most = most.max(sum);
        }
        // A limit under one threshold's worth would make the sum a second, more
        // sensitive threshold on single windows.
        s.limit = (SUSTAINED_MARGIN * most).max(1.0);
        s.limit.is_finite().then_some(s)
    }
}

/// A window adds at most this ratio to the sustained sum: one far-out window is the
/// threshold's business.
const SUSTAINED_CAP: f64 = 1.0;

/// A trained anomaly model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    pub algorithm: Algorithm,
    /// Names of the features, in the order of the vectors it scores.
    pub features: Vec<String>,
    /// Scores above this raise an alarm.
    pub threshold: f64,
    /// Rows it was trained on.
    pub trained_rows: usize,
    /// Interior decile edges of the training scores: the reference distribution that
    /// drift monitoring ([`crate::monitor`]) compares live scores against.
    #[serde(default)]
    pub reference: Vec<f64>,
    /// Features scored by their logarithm: positive and strongly right-skewed in
    /// training (kurtosis, crest factors, standard deviations), whose raw tails would
    /// set the threshold for every feature. Empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_features: Vec<bool>,
    /// [`Algorithm::PcaNormal`]: each feature's map onto normal scores (`None`: used as
    /// it is). Empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub normal_scores: Vec<Option<NormalScores>>,
    /// Share of the training rows that score above the threshold (its calibration; for
    /// `pca_normal`, by their cross-fitted scores).
    #[serde(default)]
    pub training_alarm_rate: f64,
    /// The sustained-shift alarm (a CUSUM on score / threshold, [`crate::monitor`]):
    /// windows add their ratio less its `reference`, and an alarm is raised when the sum
    /// passes its `limit`. Calibrated on the training rows in their order.
    /// `None`: off (imported models, models from before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sustained: Option<Sustained>,
    body: Body,
}

impl Model {
    /// Trains on `rows` (one feature vector per row, columns named by `features`).
    pub fn train(
        features: &[String],
        rows: ArrayView2<f64>,
        params: &TrainParams,
    ) -> Result<Model> {
        Ok(Model::train_scored(features, rows, params)?.0)
    }

    /// [`Model::train`], and the training rows' scores its calibration used, in order.
    fn train_scored(
        features: &[String],
        rows: ArrayView2<f64>,
        params: &TrainParams,
    ) -> Result<(Model, Vec<f64>)> {
        let n = rows.nrows();
        let (mut model, in_order) = if params.algorithm == Algorithm::Ensemble {
            train_ensemble(features, rows, params)?
        } else {
            let model = Model::fit(features, rows, params)?;
            let in_order: Vec<f64> = if params.algorithm == Algorithm::PcaNormal
                && n >= CROSS_FIT_FOLDS * CROSS_FIT_MIN_ROWS
            {
                cross_fitted_scores(features, rows, params)?
            } else {
                rows.outer_iter()
                    .map(|r| model.raw_score(r.as_slice().expect("row")))
                    .collect()
            };
            (model, in_order)
        };
        let mut scores = in_order.clone();
        scores.sort_by(f64::total_cmp);
        model.threshold = if params.algorithm == Algorithm::Ensemble {
            // Each member's threshold took its share of the budget (`train_ensemble`).
            1.0
        } else {
            threshold_at(&scores, params.quantile)
        };
        if model.threshold > 0.0 {
            model.sustained = Sustained::calibrate(&in_order, &scores, model.threshold);
        }
        let above = scores.len() - scores.partition_point(|s| *s <= model.threshold);
        model.training_alarm_rate = above as f64 / scores.len() as f64;
        model.reference = (1..REFERENCE_BINS)
            .map(|i| quantile(&scores, i as f64 / REFERENCE_BINS as f64))
            .collect();
        Ok((model, in_order))
    }

    /// The transforms and the body of a model trained on `rows`, not yet calibrated
    /// (threshold infinite).
    fn fit(features: &[String], rows: ArrayView2<f64>, params: &TrainParams) -> Result<Model> {
        let (n, d) = rows.dim();
        if d == 0 || d != features.len() {
            return Err(ModelError::InvalidData(format!(
                "{d} columns for {} feature names",
                features.len()
            )));
        }
        if n < 2 {
            return Err(ModelError::InvalidData(format!(
                "{n} rows: at least 2 are needed"
            )));
        }
        if let Some(((_, j), _)) = rows.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(ModelError::NotFinite(features[j].clone()));
        }
        if !(0.0..1.0).contains(&params.quantile) || params.quantile <= 0.5 {
            return Err(ModelError::InvalidParameter(format!(
                "quantile {} must be in (0.5, 1)",
                params.quantile
            )));
        }
        // Staleness grows linearly while a sensor is stuck: neither its logarithm nor
        // its normal score may hide that growth.
        let normal: Vec<Option<NormalScores>> = if params.algorithm == Algorithm::PcaNormal {
            rows.axis_iter(Axis(1))
                .zip(features)
                .map(|(c, f)| {
                    (!crate::chain::is_staleness(f)).then(|| {
                        let mut sorted = c.to_vec();
                        sorted.sort_by(f64::total_cmp);
                        NormalScores::fit(&sorted)
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        let log: Vec<bool> = rows
            .axis_iter(Axis(1))
            .zip(features)
            .map(|(c, f)| {
                normal.is_empty() && !crate::chain::is_staleness(f) && wants_log(&c.to_vec())
            })
            .collect();
        let mut prepared = rows.to_owned();
        for (j, mut col) in prepared.axis_iter_mut(Axis(1)).enumerate() {
            if log[j] {
                col.mapv_inplace(f64::ln);
            } else if let Some(Some(m)) = normal.get(j) {
                col.mapv_inplace(|v| m.map(v));
            }
        }
        let body = match params.algorithm {
            Algorithm::Pca | Algorithm::PcaNormal => train_pca(prepared.view(), params.variance)?,
            Algorithm::Robust => train_robust(prepared.view()),
            Algorithm::IsolationForest => train_forest(prepared.view(), params)?,
            Algorithm::Ensemble => {
                return Err(ModelError::InvalidParameter(
                    "an ensemble is trained member by member (Model::train)".to_owned(),
                ))
            }
            Algorithm::Onnx => {
                return Err(ModelError::InvalidParameter(
                    "onnx models are imported (ImportModel), not trained here".to_owned(),
                ))
            }
        };
        Ok(Model {
            algorithm: params.algorithm,
            features: features.to_vec(),
            threshold: f64::INFINITY,
            trained_rows: n,
            reference: Vec::new(),
            log_features: if log.contains(&true) { log } else { Vec::new() },
            normal_scores: normal,
            training_alarm_rate: 0.0,
            sustained: None,
            body,
        })
    }

    /// A model trained elsewhere: an ONNX file scoring `features` (in its input column
    /// order) on `output`; alarms above `threshold`. Compiled once here, so a model
    /// that tract cannot run is refused at import.
    pub fn from_onnx(
        features: &[String],
        onnx: &[u8],
        output: &str,
        negate: bool,
        threshold: f64,
    ) -> Result<Model> {
        use base64::Engine as _;
        if features.is_empty() {
            return Err(ModelError::InvalidParameter(
                "an onnx model needs its feature names".to_owned(),
            ));
        }
        if !threshold.is_finite() {
            return Err(ModelError::InvalidParameter(format!(
                "threshold {threshold} is not finite"
            )));
        }
        crate::onnx::scorer(onnx, features.len(), output)?;
        let model = Model {
            algorithm: Algorithm::Onnx,
            features: features.to_vec(),
            threshold,
            trained_rows: 0,
            reference: Vec::new(),
            log_features: Vec::new(),
            normal_scores: Vec::new(),
            training_alarm_rate: 0.0,
            sustained: None,
            body: Body::Onnx {
                onnx: base64::engine::general_purpose::STANDARD.encode(onnx),
                output: output.to_owned(),
                negate,
                scorer: ScorerCell::default(),
            },
        };
        model.validate()?;
        Ok(model)
    }

    /// Every feature must be `{signal}.{feature}` of a signal `kind` has.
    pub fn check_kind(&self, kind: crate::AssetKind) -> Result<()> {
        for f in &self.features {
            let signal = f.split_once('.').map_or(f.as_str(), |(s, _)| s);
            if kind.schema().signal(signal).is_err() {
                return Err(ModelError::InvalidParameter(format!(
                    "feature {f:?} is not a feature of a {kind} signal"
                )));
            }
        }
        Ok(())
    }

    /// The anomaly score of one feature vector (higher is more anomalous).
    pub fn score(&self, x: &[f64]) -> Result<f64> {
        self.check(x)?;
        Ok(self.raw_score(x))
    }

    /// Whether `x` scores above the alarm threshold.
    pub fn is_alarm(&self, x: &[f64]) -> Result<bool> {
        Ok(self.score(x)? > self.threshold)
    }

    /// An ensemble's members and their thresholds; empty for other algorithms.
    pub fn member_thresholds(&self) -> Vec<(Algorithm, f64)> {
        match &self.body {
            Body::Ensemble { members } => {
                members.iter().map(|m| (m.algorithm, m.threshold)).collect()
            }
            _ => Vec::new(),
        }
    }

    /// Each feature's share in the score of `x`, largest first.
    pub fn contributions(&self, x: &[f64]) -> Result<Vec<(String, f64)>> {
        self.check(x)?;
        let x = &*self.prepare(x);
        let parts: Vec<f64> = match &self.body {
            Body::Pca {
                mean,
                scale,
                components,
                eigenvalues,
                residual_variance,
            } => pca_terms(x, mean, scale, components, eigenvalues, *residual_variance)
                .into_iter()
                // Magnitudes: a feature's T² term can be negative.
                .map(|(t2, spe)| t2.abs() + spe)
                .collect(),
            Body::Robust { median, mad } => {
                robust_z(x, median, mad).into_iter().map(f64::abs).collect()
            }
            // An opaque model: no per-feature explanation.
            Body::Onnx { .. } => return Ok(Vec::new()),
            // The member that scores `x` highest over its threshold explains it.
            Body::Ensemble { members } => {
                return members
                    .iter()
                    .map(|m| (m.ratio(x), m))
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map_or(Ok(Vec::new()), |(_, m)| m.contributions(x));
            }
            Body::Forest { trees, .. } => {
                // How often each feature isolates `x` along its paths, weighted by how
                // early (shallow splits isolate the most anomalous points).
                let mut w = vec![0.0; x.len()];
                for t in trees {
                    path_features(t, x, 0, &mut w);
                }
                w
            }
        };
        let total: f64 = parts.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        let mut out: Vec<(String, f64)> = self
            .features
            .iter()
            .cloned()
            .zip(parts.iter().map(|p| p / total))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(out)
    }

    fn check(&self, x: &[f64]) -> Result<()> {
        if x.len() != self.features.len() {
            return Err(ModelError::WrongWidth {
                got: x.len(),
                expected: self.features.len(),
            });
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::NotFinite(self.features[i].clone()));
        }
        Ok(())
    }

    /// `x` with the features' normal-score maps or the log transform of the flagged
    /// features applied, as training applied them to its columns (a value ≤ 0 where
    /// training saw only positive ones maps far out, as it should).
    fn prepare<'a>(&self, x: &'a [f64]) -> std::borrow::Cow<'a, [f64]> {
        if !self.normal_scores.is_empty() {
            return std::borrow::Cow::Owned(
                x.iter()
                    .zip(&self.normal_scores)
                    .map(|(&v, m)| m.as_ref().map_or(v, |m| m.map(v)))
                    .collect(),
            );
        }
        if self.log_features.is_empty() {
            return std::borrow::Cow::Borrowed(x);
        }
        std::borrow::Cow::Owned(
            x.iter()
                .zip(&self.log_features)
                .map(|(&v, &l)| if l { v.max(1e-300).ln() } else { v })
                .collect(),
        )
    }

    /// The score of `x` over the threshold: what an ensemble compares its members by.
    fn ratio(&self, x: &[f64]) -> f64 {
        self.raw_score(x) / self.threshold
    }

    fn raw_score(&self, x: &[f64]) -> f64 {
        let x = &*self.prepare(x);
        match &self.body {
            Body::Pca {
                mean,
                scale,
                components,
                eigenvalues,
                residual_variance,
            } => pca_terms(x, mean, scale, components, eigenvalues, *residual_variance)
                .into_iter()
                .map(|(t2, spe)| t2 + spe)
                .sum(),
            Body::Robust { median, mad } => robust_z(x, median, mad)
                .into_iter()
                .map(f64::abs)
                .fold(0.0, f64::max),
            Body::Onnx {
                onnx,
                output,
                negate,
                scorer,
            } => {
                let s = onnx_scorer(onnx, self.features.len(), output, scorer)
                    .and_then(|sc| sc.score(x))
                    .unwrap_or(f64::NAN);
                if *negate {
                    -s
                } else {
                    s
                }
            }
            Body::Forest { trees, sample_size } => {
                let mean_path: f64 =
                    trees.iter().map(|t| path_length(t, x, 0)).sum::<f64>() / trees.len() as f64;
                2f64.powf(-mean_path / average_path(*sample_size))
            }
            Body::Ensemble { members } => members.iter().map(|m| m.ratio(x)).fold(0.0, f64::max),
        }
    }

    /// The model file: magic, format version, CRC-32 of the body, the body (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("a model serialises");
        let mut out = Vec::with_capacity(12 + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Reads a model file; anything corrupt, foreign or inconsistent is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Model> {
        if bytes.len() < 12 || &bytes[..4] != MAGIC {
            return Err(ModelError::BadMagic);
        }
        let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let version = word(4);
        if version != FORMAT_VERSION {
            return Err(ModelError::UnsupportedVersion(version));
        }
        let body = &bytes[12..];
        if crc32fast::hash(body) != word(8) {
            return Err(ModelError::Checksum);
        }
        let model: Model =
            serde_json::from_slice(body).map_err(|e| ModelError::Corrupt(e.to_string()))?;
        model.validate()?;
        Ok(model)
    }

    /// Dimensions and values agree (a file can pass its checksum and still be made by a
    /// buggy writer).
    fn validate(&self) -> Result<()> {
        let d = self.features.len();
        let bad = |what: &str| Err(ModelError::Corrupt(what.to_owned()));
        if d == 0 || self.threshold.is_nan() {
            return bad("no features or no threshold");
        }
        if let Some(s) = &self.sustained {
            if !(s.reference.is_finite()
                && s.reference > 0.0
                && s.limit.is_finite()
                && s.limit > 0.0)
            {
                return bad("sustained-shift calibration out of range");
            }
        }
        if !self.log_features.is_empty() && self.log_features.len() != d {
            return bad("log-transform flags do not match the features");
        }
        if !self.normal_scores.is_empty()
            && (self.normal_scores.len() != d
                || !self.log_features.is_empty()
                || self.normal_scores.iter().flatten().any(|m| !m.is_valid()))
        {
            return bad("normal-score maps do not match the features");
        }
        if self.reference.iter().any(|v| !v.is_finite())
            || self.reference.windows(2).any(|w| w[0] > w[1])
        {
            return bad("reference score distribution is not sorted");
        }
        let finite = |v: &[f64]| v.iter().all(|x| x.is_finite());
        match &self.body {
            Body::Pca {
                mean,
                scale,
                components,
                eigenvalues,
                residual_variance,
            } => {
                if mean.len() != d
                    || scale.len() != d
                    || components.len() != eigenvalues.len()
                    || components.iter().any(|c| c.len() != d || !finite(c))
                    || !finite(mean)
                    || scale.iter().any(|s| !(s.is_finite() && *s > 0.0))
                    || eigenvalues.iter().any(|l| !(l.is_finite() && *l > 0.0))
                    || !(residual_variance.is_finite() && *residual_variance > 0.0)
                {
                    return bad("pca dimensions or values do not agree");
                }
            }
            Body::Robust { median, mad } => {
                if median.len() != d
                    || mad.len() != d
                    || !finite(median)
                    || mad.iter().any(|m| !(m.is_finite() && *m > 0.0))
                {
                    return bad("robust baseline dimensions or values do not agree");
                }
            }
            Body::Onnx {
                onnx,
                output,
                scorer,
                ..
            } => {
                if let Err(e) = onnx_scorer(onnx, d, output, scorer) {
                    return bad(&e.to_string());
                }
            }
            Body::Forest { trees, sample_size } => {
                fn ok(t: &Tree, d: usize) -> bool {
                    match t {
                        Tree::Leaf { .. } => true,
                        Tree::Split {
                            feature,
                            value,
                            left,
                            right,
                        } => *feature < d && value.is_finite() && ok(left, d) && ok(right, d),
                    }
                }
                if trees.is_empty() || *sample_size < 2 || !trees.iter().all(|t| ok(t, d)) {
                    return bad("isolation forest trees do not agree with the features");
                }
            }
            Body::Ensemble { members } => {
                if members.is_empty()
                    || !self.log_features.is_empty()
                    || !self.normal_scores.is_empty()
                {
                    return bad("an ensemble needs members and has no transforms of its own");
                }
                for m in members {
                    if m.features != self.features
                        || !ENSEMBLE_MEMBERS.contains(&m.algorithm)
                        || !(m.threshold.is_finite() && m.threshold > 0.0)
                    {
                        return bad("ensemble members do not agree with the ensemble");
                    }
                    m.validate()?;
                }
            }
        }
        Ok(())
    }
}

/// The compiled scorer of a base64 ONNX body: the model's own once looked up, else the
/// process-wide plan for the same file (compiled on first use).
fn onnx_scorer(
    onnx: &str,
    width: usize,
    output: &str,
    cell: &ScorerCell,
) -> Result<std::sync::Arc<crate::onnx::OnnxScorer>> {
    use base64::Engine as _;
    if let Some(s) = cell.0.get() {
        return Ok(s.clone());
    }
    let s = crate::onnx::cached(crc32fast::hash(onnx.as_bytes()), width, output, || {
        base64::engine::general_purpose::STANDARD
            .decode(onnx)
            .map_err(|e| ModelError::Corrupt(format!("onnx body: {e}")))
    })?;
    let _ = cell.0.set(s.clone());
    Ok(s)
}

/// Knots of [`NormalScores`]: training quantiles at evenly spaced probabilities.
const NORMAL_KNOTS: usize = 128;
/// Knots of [`NormalScores`] closer than this share of the training range are one.
const NORMAL_TIE: f64 = 1e-6;

/// One feature's map onto normal scores ([`Algorithm::PcaNormal`]): its training
/// quantiles `x` (strictly increasing) and the standard-normal quantiles `z` at the same
/// probabilities (ties averaged), linear between knots and beyond the ends with the end
/// segments' slopes. A feature with one value in training maps to its distance from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NormalScores {
    x: Vec<f64>,
    z: Vec<f64>,
}

impl NormalScores {
    /// From a sorted training column of at least 2 values. Knots closer than
    /// [`NORMAL_TIE`] of the column's range are ties: a counter's rate computed from
    /// large floating-point values differs in its last bits, and a segment that narrow
    /// would map those bits (or a value just beyond it) to tens of standard deviations.
    fn fit(sorted: &[f64]) -> NormalScores {
        let n = sorted.len() as f64;
        let tie = NORMAL_TIE * (sorted[sorted.len() - 1] - sorted[0]);
        let (mut x, mut z) = (Vec::<f64>::new(), Vec::<f64>::new());
        let mut tied = 0.0;
        for i in 0..NORMAL_KNOTS {
            // From 0.5/n to 1 - 0.5/n: the range a sample of n resolves.
            let p = (0.5 + i as f64 * (n - 1.0) / (NORMAL_KNOTS - 1) as f64) / n;
            let (xi, zi) = (quantile(sorted, p), normal_quantile(p));
            match x.last() {
                Some(last) if xi - *last <= tie => {
                    tied += 1.0;
                    let zl = z.last_mut().expect("a knot");
                    *zl += (zi - *zl) / tied;
                }
                _ => {
                    x.push(xi);
                    z.push(zi);
                    tied = 1.0;
                }
            }
        }
        NormalScores { x, z }
    }

    fn map(&self, v: f64) -> f64 {
        let (x, z) = (&self.x, &self.z);
        let k = x.len();
        if k == 1 {
            return v - x[0];
        }
        let segment = |i: usize| z[i] + (v - x[i]) * (z[i + 1] - z[i]) / (x[i + 1] - x[i]);
        if v <= x[0] {
            segment(0)
        } else if v >= x[k - 1] {
            segment(k - 2)
        } else {
            // x[i - 1] <= v < x[i]
            segment(x.partition_point(|a| *a <= v) - 1)
        }
    }

    fn is_valid(&self) -> bool {
        let increasing =
            |v: &[f64]| v.iter().all(|a| a.is_finite()) && v.windows(2).all(|w| w[0] < w[1]);
        !self.x.is_empty()
            && self.x.len() == self.z.len()
            && increasing(&self.x)
            && increasing(&self.z)
    }
}

/// The standard normal quantile Φ⁻¹(p), p in (0, 1).
fn normal_quantile(p: f64) -> f64 {
    -std::f64::consts::SQRT_2 * statrs::function::erf::erfc_inv(2.0 * p)
}

/// Whether a training column is better scored by its logarithm: all positive and
/// skewness above 2.
fn wants_log(col: &[f64]) -> bool {
    if col.len() < 3 || col.iter().any(|v| *v <= 0.0) {
        return false;
    }
    let n = col.len() as f64;
    let mean = col.iter().sum::<f64>() / n;
    let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    if var <= 0.0 {
        return false;
    }
    let skew = col.iter().map(|v| (v - mean).powi(3)).sum::<f64>() / n / var.powf(1.5);
    skew > 2.0
}

/// Folds of [`cross_fitted_scores`], and the fewest rows each must have.
const CROSS_FIT_FOLDS: usize = 5;
const CROSS_FIT_MIN_ROWS: usize = 100;

/// An [`Algorithm::Ensemble`], uncalibrated, and its training rows' scores: each row's
/// largest member score over that member's threshold, by the scores each member was
/// calibrated on (cross-fitted ones for pca_normal).
fn train_ensemble(
    features: &[String],
    rows: ArrayView2<f64>,
    params: &TrainParams,
) -> Result<(Model, Vec<f64>)> {
    let mut combined = vec![0.0f64; rows.nrows()];
    let mut members = Vec::new();
    for algorithm in ENSEMBLE_MEMBERS {
        // Bonferroni: the members share the false-alarm budget 1 − quantile.
        let p = TrainParams {
            algorithm,
            quantile: 1.0 - (1.0 - params.quantile) / ENSEMBLE_MEMBERS.len() as f64,
            ..params.clone()
        };
        let (m, scores) = Model::train_scored(features, rows, &p)?;
        if !(m.threshold.is_finite() && m.threshold > 0.0) {
            return Err(ModelError::InvalidData(format!(
                "ensemble member {algorithm}: threshold {} (the training rows score alike)",
                m.threshold
            )));
        }
        for (c, s) in combined.iter_mut().zip(&scores) {
            *c = c.max(s / m.threshold);
        }
        members.push(m);
    }
    let model = Model {
        algorithm: Algorithm::Ensemble,
        features: features.to_vec(),
        threshold: f64::INFINITY,
        trained_rows: rows.nrows(),
        reference: Vec::new(),
        log_features: Vec::new(),
        normal_scores: Vec::new(),
        training_alarm_rate: 0.0,
        sustained: None,
        body: Body::Ensemble { members },
    };
    Ok((model, combined))
}

/// Scores of `rows`, in their order, each by a model fitted on the other folds: the
/// training rows cut into [`CROSS_FIT_FOLDS`] consecutive blocks, each scored by a model
/// of the rest. `pca_normal` calibrates on these: its quantile maps are fitted to the
/// rows they map, which bounds those rows' normal scores, while a new day's values fall
/// beyond the training range and are extrapolated; scored in-sample its healthy tail is
/// lighter than live, and the threshold too low (6 false alarms per 10,000 healthy
/// windows of the crankshaft line, each 1.0–1.34 × the threshold).
fn cross_fitted_scores(
    features: &[String],
    rows: ArrayView2<f64>,
    params: &TrainParams,
) -> Result<Vec<f64>> {
    let n = rows.nrows();
    let mut out = Vec::with_capacity(n);
    for k in 0..CROSS_FIT_FOLDS {
        let (lo, hi) = (k * n / CROSS_FIT_FOLDS, (k + 1) * n / CROSS_FIT_FOLDS);
        let rest = ndarray::concatenate(
            Axis(0),
            &[
                rows.slice(ndarray::s![..lo, ..]),
                rows.slice(ndarray::s![hi.., ..]),
            ],
        )
        .map_err(|e| ModelError::InvalidData(e.to_string()))?;
        let m = Model::fit(features, rest.view(), params)?;
        out.extend(
            rows.slice(ndarray::s![lo..hi, ..])
                .outer_iter()
                .map(|r| m.raw_score(r.as_slice().expect("row"))),
        );
    }
    Ok(out)
}

/// Fewest training scores above a threshold for it to be read off them directly.
const TAIL_MIN_ROWS: usize = 10;
/// Share of the training scores whose excesses the tail fit uses.
const TAIL_SHARE: f64 = 0.02;

/// The alarm threshold at quantile `q` of the sorted training `scores`. Read off them
/// while at least [`TAIL_MIN_ROWS`] lie above it; beyond (a quantile of 0.9999 from
/// 5,000 rows), extrapolated by peaks over threshold: the excesses over the
/// 1 − [`TAIL_SHARE`] quantile follow a generalised Pareto distribution
/// (Pickands–Balkema–de Haan), fitted by probability-weighted moments (Hosking & Wallis
/// 1987). Never below the empirical quantile, so a fitted tail that ends early cannot
/// put training rows above the threshold that the quantile keeps under it.
fn threshold_at(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    let empirical = quantile(sorted, q);
    if (1.0 - q) * n as f64 >= TAIL_MIN_ROWS as f64 {
        return empirical;
    }
    let u = quantile(sorted, 1.0 - TAIL_SHARE);
    let excess: Vec<f64> = sorted.iter().filter(|s| **s > u).map(|s| s - u).collect();
    let m = excess.len();
    if m < TAIL_MIN_ROWS {
        return empirical;
    }
    match gpd_quantile(&excess, (1.0 - q) * n as f64 / m as f64) {
        Some(y) if (u + y).is_finite() => (u + y).max(empirical),
        _ => empirical,
    }
}

/// The excess exceeded with probability `p` under a generalised Pareto distribution
/// fitted to the ascending `excess` by probability-weighted moments. `None` when the
/// moments do not define one.
fn gpd_quantile(excess: &[f64], p: f64) -> Option<f64> {
    let m = excess.len() as f64;
    let a0 = excess.iter().sum::<f64>() / m;
    // a1 = E[Y (1 − F(Y))], unbiased from the order statistics.
    let a1 = excess
        .iter()
        .enumerate()
        .map(|(j, y)| (m - 1.0 - j as f64) / (m - 1.0) * y)
        .sum::<f64>()
        / m;
    let d = a0 - 2.0 * a1;
    if !(d > 0.0 && a0 > 0.0) {
        return None;
    }
    // Hosking & Wallis: k = a0/(a0 − 2a1) − 2, σ = 2 a0 a1/(a0 − 2a1); shape ξ = −k.
    let xi = 2.0 - a0 / d;
    let sigma = 2.0 * a0 * a1 / d;
    if sigma.is_nan() || sigma <= 0.0 {
        return None;
    }
    Some(if xi.abs() < 1e-9 {
        -sigma * p.ln()
    } else {
        sigma / xi * (p.powf(-xi) - 1.0)
    })
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn standardise(x: &[f64], mean: &[f64], scale: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(mean)
        .zip(scale)
        .map(|((v, m), s)| (v - m) / s)
        .collect()
}

fn reconstruct(z: &[f64], components: &[Vec<f64>]) -> Vec<f64> {
    let mut out = vec![0.0; z.len()];
    for c in components {
        let t = dot(c, z);
        for (o, ci) in out.iter_mut().zip(c) {
            *o += t * ci;
        }
    }
    out
}

/// The PCA score of `x` split by feature: its term of Hotelling's T²
/// (z_j Σ_k t_k c_kj / λ_k, which sum to Σ_k t_k² / λ_k) and its squared reconstruction
/// error over the residual variance.
fn pca_terms(
    x: &[f64],
    mean: &[f64],
    scale: &[f64],
    components: &[Vec<f64>],
    eigenvalues: &[f64],
    residual_variance: f64,
) -> Vec<(f64, f64)> {
    let z = standardise(x, mean, scale);
    let recon = reconstruct(&z, components);
    let t: Vec<f64> = components.iter().map(|c| dot(c, &z)).collect();
    (0..z.len())
        .map(|j| {
            let weight: f64 = components
                .iter()
                .zip(&t)
                .zip(eigenvalues)
                .map(|((c, tk), l)| tk * c[j] / l)
                .sum();
            (weight * z[j], (z[j] - recon[j]).powi(2) / residual_variance)
        })
        .collect()
}

/// The scale of a feature that did not vary in training, around `centre`: a millionth
/// of its magnitude (at least 1e-9), so any change in it is notable.
fn constant_scale(centre: f64) -> f64 {
    (centre.abs() * 1e-6).max(1e-9)
}

fn train_pca(rows: ArrayView2<f64>, variance: f64) -> Result<Body> {
    if !(variance > 0.0 && variance <= 1.0) {
        return Err(ModelError::InvalidParameter(format!(
            "pca variance {variance} must be in (0, 1]"
        )));
    }
    let n = rows.nrows() as f64;
    let mean = rows.mean_axis(Axis(0)).expect("rows");
    let centred = &rows - &mean;
    let std = centred
        .mapv(|v| v * v)
        .sum_axis(Axis(0))
        .mapv(|s| (s / (n - 1.0)).sqrt());
    // A feature constant in training (a turnstile's `people_in.min`, always 0): any
    // change is a regime it never saw, scaled by its magnitude as the robust baseline
    // scales it. Scale 1 would weigh a stuck count of 2 like two standard deviations.
    let scale: Array1<f64> = std
        .iter()
        .zip(&mean)
        .map(|(&s, &m)| if s > 1e-12 { s } else { constant_scale(m) })
        .collect();
    let z = &centred / &scale;
    let cov: Array2<f64> = z.t().dot(&z) / (n - 1.0);
    let (values, vectors) = jacobi_eigen(cov);
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    let total: f64 = values.iter().map(|v| v.max(0.0)).sum::<f64>().max(1e-12);
    let mut kept = 0;
    let mut explained = 0.0;
    while kept < order.len() && explained / total < variance {
        explained += values[order[kept]].max(0.0);
        kept += 1;
    }
    let kept = kept.clamp(1, order.len());
    // Floors keep scores finite when components explain (almost) everything.
    let floor = total * 1e-6;
    let components: Vec<Vec<f64>> = order[..kept]
        .iter()
        .map(|&i| vectors.column(i).to_vec())
        .collect();
    let eigenvalues: Vec<f64> = order[..kept]
        .iter()
        .map(|&i| values[i].max(floor))
        .collect();
    let rest: Vec<f64> = order[kept..].iter().map(|&i| values[i].max(0.0)).collect();
    let residual_variance = if rest.is_empty() {
        floor
    } else {
        (rest.iter().sum::<f64>() / rest.len() as f64).max(floor)
    };
    Ok(Body::Pca {
        mean: mean.to_vec(),
        scale: scale.to_vec(),
        components,
        eigenvalues,
        residual_variance,
    })
}

/// Eigenvalues and eigenvectors (columns) of a symmetric matrix, by cyclic Jacobi
/// rotations (feature counts here are small: tens).
fn jacobi_eigen(mut a: Array2<f64>) -> (Vec<f64>, Array2<f64>) {
    let n = a.nrows();
    let mut v = Array2::<f64>::eye(n);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[[i, j]].powi(2))
            .sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[[p, q]].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[[q, q]] - a[[p, p]]) / (2.0 * a[[p, q]]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[[k, p]], a[[k, q]]);
                    a[[k, p]] = c * akp - s * akq;
                    a[[k, q]] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[[p, k]], a[[q, k]]);
                    a[[p, k]] = c * apk - s * aqk;
                    a[[q, k]] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[[k, p]], v[[k, q]]);
                    v[[k, p]] = c * vkp - s * vkq;
                    v[[k, q]] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[[i, i]]).collect(), v)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn train_robust(rows: ArrayView2<f64>) -> Body {
    let mut med = Vec::new();
    let mut mad = Vec::new();
    for col in rows.axis_iter(Axis(1)) {
        let mut c = col.to_vec();
        let m = median(&mut c);
        let mut dev: Vec<f64> = c.iter().map(|x| (x - m).abs()).collect();
        let d = median(&mut dev) * 1.4826;
        // A feature that mostly repeats one value (the share of repeated samples of a
        // sample-and-hold signal) has a MAD near 0 and rare, far "outliers" that would
        // set the threshold for every feature: scaled by its standard deviation instead.
        let n = c.len().max(1) as f64;
        let mean = c.iter().sum::<f64>() / n;
        let sd = (c.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        let d = if d < 0.1 * sd { sd } else { d };
        let d = d.max(constant_scale(m));
        // Heavy-tailed features (kurtosis, crest factors of windows where a job starts)
        // would set the threshold for all: each feature's scale is widened by its own
        // 0.99 quantile of |z|, so every feature's healthy tail ends near 1.
        let mut z: Vec<f64> = c.iter().map(|x| ((x - m) / d).abs()).collect();
        z.sort_by(f64::total_cmp);
        let tail = quantile(&z, 0.99).max(1.0);
        med.push(m);
        mad.push(d * tail);
    }
    Body::Robust { median: med, mad }
}

fn robust_z(x: &[f64], median: &[f64], mad: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(median)
        .zip(mad)
        .map(|((v, m), d)| (v - m) / d)
        .collect()
}

/// c(n): the average path length of an unsuccessful search in a binary search tree.
fn average_path(n: usize) -> f64 {
    match n {
        0 | 1 => 0.0,
        2 => 1.0,
        n => {
            let n = n as f64;
            2.0 * ((n - 1.0).ln() + 0.577_215_664_901_532_9) - 2.0 * (n - 1.0) / n
        }
    }
}

fn train_forest(rows: ArrayView2<f64>, params: &TrainParams) -> Result<Body> {
    if params.trees == 0 || params.trees > 10_000 {
        return Err(ModelError::InvalidParameter(format!(
            "{} trees: expected 1..=10000",
            params.trees
        )));
    }
    if params.sample_size < 2 {
        return Err(ModelError::InvalidParameter(format!(
            "sample size {}: expected at least 2",
            params.sample_size
        )));
    }
    let psi = params.sample_size.min(rows.nrows());
    let limit = (psi as f64).log2().ceil() as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let trees = (0..params.trees)
        .map(|_| {
            let idx = sample_indices(&mut rng, rows.nrows(), psi).into_vec();
            grow(rows, idx, 0, limit, &mut rng)
        })
        .collect();
    Ok(Body::Forest {
        trees,
        sample_size: psi,
    })
}

fn grow(
    rows: ArrayView2<f64>,
    idx: Vec<usize>,
    depth: usize,
    limit: usize,
    rng: &mut ChaCha8Rng,
) -> Tree {
    if depth >= limit || idx.len() <= 1 {
        return Tree::Leaf { size: idx.len() };
    }
    // Features that still vary among these rows.
    let varying: Vec<(usize, f64, f64)> = (0..rows.ncols())
        .filter_map(|j| {
            let (lo, hi) = idx
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &i| {
                    (lo.min(rows[[i, j]]), hi.max(rows[[i, j]]))
                });
            (hi > lo).then_some((j, lo, hi))
        })
        .collect();
    if varying.is_empty() {
        return Tree::Leaf { size: idx.len() };
    }
    let (feature, lo, hi) = varying[rng.random_range(0..varying.len())];
    let value = rng.random_range(lo..hi);
    let (left, right): (Vec<usize>, Vec<usize>) =
        idx.into_iter().partition(|&i| rows[[i, feature]] < value);
    Tree::Split {
        feature,
        value,
        left: Box::new(grow(rows, left, depth + 1, limit, rng)),
        right: Box::new(grow(rows, right, depth + 1, limit, rng)),
    }
}

fn path_length(t: &Tree, x: &[f64], depth: usize) -> f64 {
    match t {
        Tree::Leaf { size } => depth as f64 + average_path(*size),
        Tree::Split {
            feature,
            value,
            left,
            right,
        } => {
            let next = if x[*feature] < *value { left } else { right };
            path_length(next, x, depth + 1)
        }
    }
}

fn path_features(t: &Tree, x: &[f64], depth: usize, w: &mut [f64]) {
    if let Tree::Split {
        feature,
        value,
        left,
        right,
    } = t
    {
        w[*feature] += 1.0 / (depth + 1) as f64;
        let next = if x[*feature] < *value { left } else { right };
        path_features(next, x, depth + 1, w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    fn names(d: usize) -> Vec<String> {
        (0..d).map(|i| format!("f{i}")).collect()
    }

    /// Correlated healthy features: x1 ≈ 2·x0, x2 ≈ −x0, x3 independent.
    fn healthy(n: usize, seed: u64) -> Array2<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let g = Normal::new(0.0, 1.0).unwrap();
        let e = Normal::new(0.0, 0.05).unwrap();
        let mut m = Array2::zeros((n, 4));
        for i in 0..n {
            let a = g.sample(&mut rng);
            m[[i, 0]] = 10.0 + a;
            m[[i, 1]] = 20.0 + 2.0 * a + e.sample(&mut rng);
            m[[i, 2]] = 5.0 - a + e.sample(&mut rng);
            m[[i, 3]] = 100.0 + 3.0 * g.sample(&mut rng);
        }
        m
    }

    fn params(algorithm: Algorithm) -> TrainParams {
        TrainParams {
            algorithm,
            ..TrainParams::default()
        }
    }

    #[test]
    fn every_algorithm_separates_faults_from_healthy_windows() {
        let train = healthy(2000, 1);
        let test = healthy(2000, 2);
        // The correlated group far out together (6 σ), one independent feature far out
        // alone, and a broken correlation (x1 no longer 2·x0, each value in range).
        let joint = [16.0, 32.0, -1.0, 100.0];
        let single = [10.0, 20.0, 5.0, 140.0];
        let broken = [10.0, 23.0, 5.0, 100.0];
        for alg in Algorithm::ALL {
            // The forest's scores saturate for points outside its sub-samples' range,
            // where the healthy tail already is: it needs a lower quantile.
            let (quantile, max_alarms) = match alg {
                Algorithm::IsolationForest => (0.99, 40),
                _ => (0.999, 12),
            };
            let p = TrainParams {
                quantile,
                ..params(alg)
            };
            let m = Model::train(&names(4), train.view(), &p).unwrap();
            let alarms = test
                .outer_iter()
                .filter(|r| m.is_alarm(r.as_slice().unwrap()).unwrap())
                .count();
            // About (1 − quantile) of healthy windows, with margin.
            assert!(
                alarms <= max_alarms,
                "{alg:?}: {alarms} false alarms in 2000"
            );
            assert!(
                m.is_alarm(&joint).unwrap(),
                "{alg:?} misses a joint excursion"
            );
            let top = &m.contributions(&joint).unwrap()[0].0;
            assert_ne!(
                top, "f3",
                "{alg:?} blames the one feature that did not move"
            );
            match alg {
                // Each split picks one of four features at random: a lone excursion
                // isolates only along the splits on its own feature.
                Algorithm::IsolationForest => {
                    assert!(!m.is_alarm(&single).unwrap());
                    assert!(
                        m.score(&single).unwrap() > m.score(&[10.0, 20.0, 5.0, 100.0]).unwrap()
                    );
                }
                _ => {
                    assert!(
                        m.is_alarm(&single).unwrap(),
                        "{alg:?} misses a lone excursion"
                    );
                    assert_eq!(m.contributions(&single).unwrap()[0].0, "f3", "{alg:?}");
                }
            }
            // Only the correlation-aware models see a broken correlation.
            assert_eq!(
                m.is_alarm(&broken).unwrap(),
                matches!(
                    alg,
                    Algorithm::Pca | Algorithm::PcaNormal | Algorithm::Ensemble
                ),
                "{alg:?}"
            );
        }
    }

    #[test]
    fn pca_finds_the_principal_axes_of_known_data() {
        // Two features, perfectly correlated: one component explains everything.
        let rows =
            Array2::from_shape_fn((100, 2), |(i, j)| i as f64 * if j == 0 { 1.0 } else { 3.0 });
        let m = Model::train(&names(2), rows.view(), &params(Algorithm::Pca)).unwrap();
        let Body::Pca {
            components,
            eigenvalues,
            ..
        } = &m.body
        else {
            panic!()
        };
        assert_eq!(components.len(), 1);
        // Standardised, the two features are identical: eigenvalue 2, axis (1,1)/√2.
        assert!((eigenvalues[0] - 2.0).abs() < 1e-9, "{eigenvalues:?}");
        assert!((components[0][0].abs() - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-9);
        assert!((components[0][0] - components[0][1]).abs() < 1e-9);
    }

    #[test]
    fn robust_scores_are_z_scores_around_the_median() {
        let rows = Array2::from_shape_vec((5, 1), vec![-1.0, 0.0, 1.0, 2.0, 3.0]).unwrap();
        let m = Model::train(&names(1), rows.view(), &params(Algorithm::Robust)).unwrap();
        // median 1, MAD 1 → 1.4826; the 0.99 quantile of |z| is 2 / 1.4826, so the
        // feature's scale widens to 2.
        assert!(m.log_features.is_empty());
        assert!((m.score(&[1.0]).unwrap()).abs() < 1e-12);
        assert!((m.score(&[3.0]).unwrap() - 1.0).abs() < 1e-9);
        assert!((m.score(&[-3.0]).unwrap() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn a_mostly_repeating_feature_does_not_blind_the_robust_baseline() {
        // Feature 0 repeats 0.9 in 99 of 100 rows (MAD 0), feature 1 is spread evenly.
        let n = 1000;
        let mut v = Vec::with_capacity(2 * n);
        for i in 0..n {
            v.push(if i % 100 == 0 { 0.91 } else { 0.9 });
            v.push((i % 50) as f64 / 10.0);
        }
        let rows = Array2::from_shape_vec((n, 2), v).unwrap();
        let m = Model::train(&names(2), rows.view(), &params(Algorithm::Robust)).unwrap();
        // The rare 0.91 no longer sets a threshold that nothing else reaches: a row far
        // out in feature 1 alone is above it, a typical row is not.
        assert!(
            m.score(&[0.9, 60.0]).unwrap() > m.threshold,
            "{}",
            m.threshold
        );
        assert!(m.score(&[0.9, 2.5]).unwrap() < m.threshold);
        // And a stuck feature 0 (1.0 instead of 0.9) is seen too.
        assert!(m.score(&[1.0, 2.5]).unwrap() > m.threshold);
    }

    #[test]
    fn normal_score_thresholds_are_calibrated_on_rows_their_maps_did_not_see() {
        // Scored in-sample, rows lie within the maps' knots; new rows fall beyond them.
        // Calibrated on held-out folds, the share of new healthy rows above the
        // threshold stays near 1 − quantile.
        let train = healthy(3000, 1);
        let test = healthy(60_000, 2);
        let p = TrainParams {
            quantile: 0.999,
            ..params(Algorithm::PcaNormal)
        };
        let m = Model::train(&names(4), train.view(), &p).unwrap();
        let above = test
            .outer_iter()
            .filter(|r| m.is_alarm(r.as_slice().unwrap()).unwrap())
            .count();
        let in_sample = {
            let fitted = Model::fit(&names(4), train.view(), &p).unwrap();
            let mut s: Vec<f64> = train
                .outer_iter()
                .map(|r| fitted.raw_score(r.as_slice().unwrap()))
                .collect();
            s.sort_by(f64::total_cmp);
            threshold_at(&s, p.quantile)
        };
        let in_sample_above = test
            .outer_iter()
            .filter(|r| m.score(r.as_slice().unwrap()).unwrap() > in_sample)
            .count();
        // Measured: 81 (cross-fitted) and 174 (in-sample) of 60,000; 60 expected.
        assert!(above <= 120, "{above} of 60,000 above (expected about 60)");
        assert!(in_sample_above > above, "{in_sample_above} in-sample");
        assert!(m.threshold > in_sample);
    }

    #[test]
    fn a_feature_constant_in_training_alarms_when_it_changes() {
        // The healthy features plus a count that training only ever saw at 0 (a
        // turnstile's slowest second): a stuck count of 2 alone is an alarm for PCA on
        // raw and on normal-scored features, while healthy rows stay under.
        let base = healthy(2000, 1);
        let mut train = Array2::zeros((2000, 5));
        train.slice_mut(ndarray::s![.., ..4]).assign(&base);
        for alg in [Algorithm::Pca, Algorithm::PcaNormal] {
            let m = Model::train(&names(5), train.view(), &params(alg)).unwrap();
            let typical = [10.0, 20.0, 5.0, 100.0, 0.0];
            let stuck = [10.0, 20.0, 5.0, 100.0, 2.0];
            assert!(m.score(&typical).unwrap() < m.threshold, "{alg}");
            assert!(
                m.score(&stuck).unwrap() > 100.0 * m.threshold,
                "{alg}: {} against {}",
                m.score(&stuck).unwrap(),
                m.threshold
            );
            assert_eq!(m.contributions(&stuck).unwrap()[0].0, "f4", "{alg}");
        }
    }

    fn sorted(mut v: Vec<f64>) -> Vec<f64> {
        v.sort_by(f64::total_cmp);
        v
    }

    #[test]
    fn thresholds_beyond_the_training_rows_extrapolate_the_tail() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let uniform: Vec<f64> = (0..200_000)
            .map(|_| rng.random_range(f64::EPSILON..1.0))
            .collect();
        // Exponential scores (light tail, ξ = 0): the 1 − 10⁻⁶ quantile is ln 10⁶ = 13.8,
        // beyond the largest of 200,000 rows (about ln 200,000 = 12.2).
        let exp = sorted(uniform.iter().map(|u| -u.ln()).collect());
        let t = threshold_at(&exp, 1.0 - 1e-6);
        assert!((t / 1e6f64.ln() - 1.0).abs() < 0.1, "{t}");
        assert!(t > exp[exp.len() - 1]);
        // Pareto scores (heavy tail, ξ = 0.25): the quantile is (10⁻⁶)^(−1/4) = 31.6.
        let pareto = sorted(uniform.iter().map(|u| u.powf(-0.25)).collect());
        let t = threshold_at(&pareto, 1.0 - 1e-6);
        assert!((t / 1e6f64.powf(0.25) - 1.0).abs() < 0.15, "{t}");
        // Bounded scores (uniform, ξ = −1): never under the largest training score, and
        // not past the bound by much.
        let bounded = sorted(uniform.clone());
        let t = threshold_at(&bounded, 1.0 - 1e-6);
        assert!(t >= bounded[bounded.len() - 1] && t < 1.01, "{t}");
        // Where the rows resolve the quantile, it is read off them.
        assert_eq!(threshold_at(&exp, 0.99), quantile(&exp, 0.99));
    }

    #[test]
    fn normal_scores_follow_the_training_quantiles() {
        // Uniform on [0, 1000]: the score of the p quantile is Φ⁻¹(p).
        let sorted: Vec<f64> = (0..=10_000).map(|i| i as f64 / 10.0).collect();
        let m = NormalScores::fit(&sorted);
        assert_eq!(m.x.len(), NORMAL_KNOTS);
        for p in [0.01, 0.1, 0.5, 0.9, 0.99] {
            let z = m.map(quantile(&sorted, p));
            assert!((z - normal_quantile(p)).abs() < 0.02, "p {p}: {z}");
        }
        assert!((normal_quantile(0.975) - 1.959_964).abs() < 1e-5);
        // Beyond the range: on with the end segment's slope.
        let k = m.x.len();
        let slope = (m.z[k - 1] - m.z[k - 2]) / (m.x[k - 1] - m.x[k - 2]);
        assert!((m.map(1100.0) - (m.z[k - 1] + (1100.0 - m.x[k - 1]) * slope)).abs() < 1e-9);
        assert!(m.map(-50.0) < m.z[0]);
        // Mostly one value: its knots are one, at their mean normal quantile, and values
        // that differ from it in their last bits map to it.
        let mut atom: Vec<f64> = (0..1000)
            .map(|i| {
                if i < 900 {
                    0.0125 + (i % 3) as f64 * 1e-15
                } else {
                    0.0125 + i as f64 * 1e-5
                }
            })
            .collect();
        atom.sort_by(f64::total_cmp);
        let m = NormalScores::fit(&atom);
        assert!(m.is_valid());
        assert!(m.x.len() < NORMAL_KNOTS / 5, "{} knots", m.x.len());
        assert!(
            m.map(0.0125 + 2e-15).abs() < 1.5,
            "{}",
            m.map(0.0125 + 2e-15)
        );
        // One value only: the distance from it.
        let m = NormalScores::fit(&[3.0; 10]);
        assert_eq!((m.map(3.0), m.map(5.0)), (0.0, 2.0));
    }

    #[test]
    fn normal_scores_turn_a_monotone_relation_into_a_linear_one() {
        // f1 = (f0 − 10)³: related, but not linearly; f2 independent.
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let g = Normal::new(0.0, 1.0).unwrap();
        let mut rows = Array2::zeros((5000, 3));
        for i in 0..5000 {
            let a: f64 = g.sample(&mut rng);
            rows[[i, 0]] = 10.0 + a;
            rows[[i, 1]] = a.powi(3) + 0.01 * g.sample(&mut rng);
            rows[[i, 2]] = 100.0 + 3.0 * g.sample(&mut rng);
        }
        let names = names(3);
        let plain = Model::train(&names, rows.view(), &params(Algorithm::Pca)).unwrap();
        let normal = Model::train(&names, rows.view(), &params(Algorithm::PcaNormal)).unwrap();
        // Each value in range, the relation broken: f1 of a = −0.5 or 0 at a = 0.5 or 1.
        // (Cross-fitted, the threshold is higher than in-sample: held-out tails of a
        // cubic are extrapolated by the other folds' maps. 1.9× at the first.)
        for broken in [[10.5, -0.125, 100.0], [11.0, 0.0, 100.0]] {
            assert!(!plain.is_alarm(&broken).unwrap(), "{broken:?}");
            assert!(
                normal.score(&broken).unwrap() > 1.5 * normal.threshold,
                "{broken:?}: {} against {}",
                normal.score(&broken).unwrap(),
                normal.threshold
            );
        }
        assert!(normal.is_alarm(&[10.0, 0.0, 100.0]).is_ok_and(|a| !a));
        assert_eq!(normal.normal_scores.len(), 3);
        assert!(normal.log_features.is_empty());
    }

    #[test]
    fn an_ensemble_alarms_where_either_member_does_within_one_budget() {
        // f1 = (f0 − 10)³ (monotone, not linear: pca_normal's), f3 ≈ 2·f2 (linear: PCA's
        // strength too), f4 independent.
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let g = Normal::new(0.0, 1.0).unwrap();
        let rows_of = |n: usize, rng: &mut ChaCha8Rng| {
            let mut rows = Array2::zeros((n, 5));
            for i in 0..n {
                let a: f64 = g.sample(rng);
                let b: f64 = g.sample(rng);
                rows[[i, 0]] = 10.0 + a;
                rows[[i, 1]] = a.powi(3) + 0.01 * g.sample(rng);
                rows[[i, 2]] = 50.0 + b;
                rows[[i, 3]] = 100.0 + 2.0 * b + 0.05 * g.sample(rng);
                rows[[i, 4]] = 7.0 + g.sample(rng);
            }
            rows
        };
        let rows = rows_of(5000, &mut rng);
        let names = names(5);
        let m = Model::train(&names, rows.view(), &params(Algorithm::Ensemble)).unwrap();
        let Body::Ensemble { members } = &m.body else {
            panic!("{:?}", m.body)
        };
        let algorithms: Vec<Algorithm> = members.iter().map(|m| m.algorithm).collect();
        assert_eq!(algorithms, ENSEMBLE_MEMBERS);
        // Each member at half the budget: the same models trained at quantile 0.99995.
        for member in members {
            let alone = Model::train(
                &names,
                rows.view(),
                &TrainParams {
                    quantile: 1.0 - (1.0 - DEFAULT_QUANTILE) / 2.0,
                    ..params(member.algorithm)
                },
            )
            .unwrap();
            assert_eq!(&alone, member);
        }
        assert_eq!(m.threshold, 1.0);
        let ratio = |x: &[f64]| -> Vec<f64> {
            members
                .iter()
                .map(|p| p.score(x).unwrap() / p.threshold)
                .collect()
        };
        // The broken monotone relation (each value in range) is pca_normal's; a broken
        // linear one with both values far out along their axis, PCA's too.
        let cubic = [11.0, 0.0, 50.0, 100.0, 7.0];
        let linear = [10.0, 0.0, 50.0, 106.0, 7.0];
        for x in [cubic, linear] {
            let r = ratio(&x);
            let most = r.iter().copied().fold(0.0, f64::max);
            assert_eq!(m.score(&x).unwrap(), most, "{x:?}");
            assert!(m.is_alarm(&x).unwrap(), "{x:?}: member ratios {r:?}");
        }
        assert!(ratio(&cubic)[0] < 1.0, "plain PCA misses the cubic");
        assert_eq!(m.contributions(&linear).unwrap()[0].0, "f3");
        // A healthy day: about 1 in 10,000 above, for the two members together.
        let test = rows_of(20_000, &mut rng);
        let alarms = test
            .outer_iter()
            .filter(|r| m.is_alarm(r.as_slice().unwrap()).unwrap())
            .count();
        assert!(alarms <= 10, "{alarms} of 20,000 healthy windows");
        let sustained = m.sustained.expect("calibrated on the combined ratios");
        assert!(sustained.reference > 0.0 && sustained.reference < 1.0);

        // A member that disagrees with the ensemble is a corrupt file.
        let mut bad = m.clone();
        if let Body::Ensemble { members } = &mut bad.body {
            members[1].features[0] = "other".to_owned();
        }
        assert_eq!(
            Model::from_bytes(&bad.to_bytes()),
            Err(ModelError::Corrupt(
                "ensemble members do not agree with the ensemble".to_owned()
            ))
        );
    }

    #[test]
    fn corrupt_normal_score_maps_are_refused() {
        let train = healthy(300, 12);
        let mut m = Model::train(&names(4), train.view(), &params(Algorithm::PcaNormal)).unwrap();
        if let Some(Some(n)) = m.normal_scores.get_mut(1) {
            n.x.reverse();
        }
        let e = Model::from_bytes(&m.to_bytes()).unwrap_err();
        assert_eq!(
            e,
            ModelError::Corrupt("normal-score maps do not match the features".to_owned())
        );
        m.normal_scores.pop();
        assert!(matches!(
            Model::from_bytes(&m.to_bytes()),
            Err(ModelError::Corrupt(_))
        ));
    }

    #[test]
    fn staleness_keeps_its_linear_scale() {
        // The same right-skewed column: logged as a standard deviation, not as staleness
        // (a stuck sensor's staleness grows linearly; its logarithm would hide that).
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let col: Vec<f64> = (0..2000)
            .map(|_| 20.0 * rng.random_range(f64::EPSILON..1.0f64).powf(-0.5))
            .collect();
        let rows = Array2::from_shape_fn((2000, 2), |(i, _)| col[i]);
        let names = vec!["people_in.std".to_owned(), "people_in.stale".to_owned()];
        let m = Model::train(&names, rows.view(), &params(Algorithm::Pca)).unwrap();
        assert_eq!(m.log_features, vec![true, false]);
    }

    #[test]
    fn the_training_alarm_rate_is_the_share_of_training_rows_above_the_threshold() {
        let rows = Array2::from_shape_vec((5, 1), vec![-1.0, 0.0, 1.0, 2.0, 3.0]).unwrap();
        let p = TrainParams {
            quantile: 0.6,
            ..params(Algorithm::Robust)
        };
        let m = Model::train(&names(1), rows.view(), &p).unwrap();
        let above = rows
            .rows()
            .into_iter()
            .filter(|r| m.score(r.as_slice().unwrap()).unwrap() > m.threshold)
            .count();
        assert_eq!(above, 2);
        assert_eq!(m.training_alarm_rate, 0.4);
    }

    #[test]
    fn heavy_tailed_positive_features_are_scored_by_their_logarithm() {
        // Column 0: log-normal (skewed, positive); column 1: normal around 0.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let n = Normal::new(0.0, 1.0).unwrap();
        let rows = Array2::from_shape_fn((2000, 2), |(_, j)| {
            let z: f64 = n.sample(&mut rng);
            if j == 0 {
                (1.5 * z).exp()
            } else {
                z
            }
        });
        let m = Model::train(&names(2), rows.view(), &params(Algorithm::Robust)).unwrap();
        assert_eq!(m.log_features, vec![true, false]);
        // On the log scale, e^{±6} are equally far from the median e^0.
        let (hi, lo) = (
            m.score(&[6f64.exp(), 0.0]).unwrap(),
            m.score(&[(-6f64).exp(), 0.0]).unwrap(),
        );
        assert!((hi - lo).abs() / hi < 0.1, "{hi} {lo}");
        // A value the training never saw (≤ 0) is far out, not an error.
        assert!(m.score(&[0.0, 0.0]).unwrap() > 10.0 * m.threshold);
        let back = Model::from_bytes(&m.to_bytes()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn isolation_forest_matches_its_definition_on_trivial_trees() {
        assert_eq!(average_path(2), 1.0);
        assert!((average_path(256) - 10.244_770_9).abs() < 1e-6);
        // Same seed, same forest.
        let train = healthy(500, 3);
        let p = params(Algorithm::IsolationForest);
        let a = Model::train(&names(4), train.view(), &p).unwrap();
        let b = Model::train(&names(4), train.view(), &p).unwrap();
        assert_eq!(a, b);
        let s = a.score(&[10.0, 20.0, 5.0, 100.0]).unwrap();
        assert!(s > 0.0 && s < 0.6, "a typical point scores below 0.6: {s}");
    }

    #[test]
    fn files_round_trip_and_corruption_is_detected() {
        let train = healthy(300, 4);
        for alg in Algorithm::ALL {
            let m = Model::train(&names(4), train.view(), &params(alg)).unwrap();
            let bytes = m.to_bytes();
            let back = Model::from_bytes(&bytes).unwrap();
            assert_eq!(back, m);
            let x = [10.5, 21.0, 4.5, 99.0];
            assert_eq!(back.score(&x).unwrap(), m.score(&x).unwrap());

            let mut flipped = bytes.clone();
            let last = flipped.len() - 2;
            flipped[last] ^= 0x01;
            assert_eq!(Model::from_bytes(&flipped), Err(ModelError::Checksum));
            let mut version = bytes.clone();
            version[4] = 9;
            assert_eq!(
                Model::from_bytes(&version),
                Err(ModelError::UnsupportedVersion(9))
            );
            assert_eq!(
                Model::from_bytes(b"{\"json\": 1}"),
                Err(ModelError::BadMagic)
            );
            assert_eq!(Model::from_bytes(&bytes[..11]), Err(ModelError::BadMagic));
        }
    }

    #[test]
    fn a_file_whose_checksum_matches_but_dimensions_do_not_is_refused() {
        let train = healthy(100, 5);
        let mut m = Model::train(&names(4), train.view(), &params(Algorithm::Robust)).unwrap();
        m.features.pop();
        let e = Model::from_bytes(&m.to_bytes()).unwrap_err();
        assert!(matches!(e, ModelError::Corrupt(_)), "{e}");
    }

    #[test]
    fn bad_inputs_are_refused_with_the_reason() {
        let train = healthy(100, 6);
        let m = Model::train(&names(4), train.view(), &params(Algorithm::Pca)).unwrap();
        assert_eq!(
            m.score(&[1.0, 2.0]),
            Err(ModelError::WrongWidth {
                got: 2,
                expected: 4
            })
        );
        assert_eq!(
            m.score(&[1.0, f64::NAN, 0.0, 0.0]),
            Err(ModelError::NotFinite("f1".into()))
        );
        let mut bad = train.clone();
        bad[[3, 2]] = f64::INFINITY;
        assert_eq!(
            Model::train(&names(4), bad.view(), &params(Algorithm::Robust)),
            Err(ModelError::NotFinite("f2".into()))
        );
        let p = TrainParams {
            quantile: 1.5,
            ..params(Algorithm::Robust)
        };
        assert!(matches!(
            Model::train(&names(4), train.view(), &p),
            Err(ModelError::InvalidParameter(_))
        ));
        assert_eq!(
            "iforest".parse::<Algorithm>(),
            Ok(Algorithm::IsolationForest)
        );
        assert!("svm".parse::<Algorithm>().is_err());
    }
}
