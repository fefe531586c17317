//! A twin's anomaly monitoring (issue 6 points 3 and 4): scores each feature window with
//! the twin's model, turns scores into a `health` status, and watches the live score
//! distribution drift away from the training one.
//!
//! - **Vectors.** A twin's features arrive per signal and window (`{signal}.{feature}`),
//!   at each signal's own pace. The monitor keeps the latest value of each model
//!   feature and scores whenever a window brings one of them, once every feature has
//!   been seen: a score per feature window, the others held at their latest value.
//! - **Status.** `warn` when a score is above the model's threshold; `alarm` when
//!   [`MonitorConfig::alarm_after`] of the last [`MonitorConfig::alarm_window`] scores
//!   are above it, the latest included (one high window is noise far more often than a
//!   fault, and an intermittent fault — a swell every other window — still counts). An
//!   alarm holds until a whole `alarm_window` of scores is back below the threshold, so
//!   an intermittent fault raises one alarm, not one per window.
//! - **Sustained shifts.** A fault that moves the score only part of the way to the
//!   threshold, but for good (a line stuck in its fault state, a gate nobody passes), is
//!   caught by a CUSUM on score / threshold ([`crate::model::Sustained`], calibrated on
//!   the training rows): every window adds its ratio less the training ratios' 0.95
//!   quantile, and `alarm` is raised when the sum passes twice the largest the training
//!   rows reached (at least 1). It holds while the sum stays above.
//! - **Drift.** The population stability index (PSI) of the last
//!   [`MonitorConfig::drift_window`] scores against the training scores' deciles; above
//!   [`MonitorConfig::drift_threshold`] (0.25, the customary "significant shift") the
//!   model no longer describes the asset and is reported once, until the PSI falls back
//!   under half the threshold.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use crate::model::Model;

#[derive(Debug, Clone, PartialEq)]
pub struct MonitorConfig {
    pub alarm_after: usize,
    pub alarm_window: usize,
    pub drift_window: usize,
    pub drift_threshold: f64,
    /// Scores between two drift checks (the PSI costs a pass over the window).
    pub drift_every: usize,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            alarm_after: 2,
            alarm_window: 3,
            drift_window: 300,
            drift_threshold: 0.25,
            drift_every: 25,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Alarm,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Alarm => "alarm",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one scored window changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    pub score: f64,
    pub status: Status,
    /// Set when this window raised the alarm: each feature's share of the score,
    /// largest first.
    pub raised: Option<Vec<(String, f64)>>,
    /// Set when this window found the score distribution drifted: the PSI.
    pub drifted: Option<f64>,
}

/// The latest value of each of a model's features: a full vector whenever a window
/// brings one of them and all are known.
#[derive(Debug, Clone)]
pub struct FeatureVector {
    names: Vec<String>,
    values: Vec<Option<f64>>,
}

impl FeatureVector {
    pub fn new(names: &[String]) -> Self {
        FeatureVector {
            names: names.to_vec(),
            values: vec![None; names.len()],
        }
    }

    pub fn update(&mut self, features: &BTreeMap<String, f64>) -> Option<Vec<f64>> {
        let values: Vec<(usize, f64)> = self
            .names
            .iter()
            .enumerate()
            .filter_map(|(i, name)| features.get(name).map(|v| (i, *v)))
            .collect();
        self.update_indexed(&values)
    }

    /// Like [`FeatureVector::update`], with features given by their index in the names.
    pub fn update_indexed(&mut self, values: &[(usize, f64)]) -> Option<Vec<f64>> {
        let mut touched = false;
        for &(i, v) in values {
            if let Some(slot) = self.values.get_mut(i).filter(|_| v.is_finite()) {
                *slot = Some(v);
                touched = true;
            }
        }
        if !touched {
            return None;
        }
        self.values.iter().copied().collect()
    }
}

pub struct Monitor {
    model: Arc<Model>,
    config: MonitorConfig,
    vector: FeatureVector,
    /// Bit i: the score i windows ago was above the threshold.
    above: u64,
    /// The sustained-shift sum ([`crate::model::Sustained`]).
    sustained: f64,
    status: Status,
    recent: VecDeque<f64>,
    since_check: usize,
    drifted: bool,
    psi: Option<f64>,
}

impl Monitor {
    pub fn new(model: Arc<Model>, config: MonitorConfig) -> Self {
        Monitor {
            vector: FeatureVector::new(&model.features),
            model,
            above: 0,
            sustained: 0.0,
            status: Status::Ok,
            recent: VecDeque::with_capacity(config.drift_window.min(4096)),
            since_check: 0,
            drifted: false,
            psi: None,
            config,
        }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn status(&self) -> Status {
        self.status
    }

    /// The PSI at the last drift check (None until the window first filled).
    pub fn psi(&self) -> Option<f64> {
        self.psi
    }

    /// Takes one window's features; scores when they touch the model and every model
    /// feature is known.
    pub fn observe(&mut self, features: &BTreeMap<String, f64>) -> Option<Assessment> {
        let x = self.vector.update(features)?;
        self.assess(&x)
    }

    /// Scores one full feature vector.
    pub fn assess(&mut self, x: &[f64]) -> Option<Assessment> {
        let score = self.model.score(x).ok()?;
        let was = self.status;
        let n = self.config.alarm_window.clamp(1, 64);
        let high = score > self.model.threshold;
        self.above = (self.above << 1) | u64::from(high);
        if n < 64 {
            self.above &= (1u64 << n) - 1;
        }
        let count = self.above.count_ones() as usize;
        let sustained = match &self.model.sustained {
            Some(c) if self.model.threshold > 0.0 => {
                self.sustained = c.step(self.sustained, score / self.model.threshold);
                self.sustained > c.limit
            }
            _ => false,
        };
        let raise = (high && count >= self.config.alarm_after.clamp(1, n)) || sustained;
        let hold = was == Status::Alarm && (count > 0 || sustained);
        self.status = if raise || hold {
            Status::Alarm
        } else if high {
            Status::Warn
        } else {
            Status::Ok
        };
        let raised = (self.status == Status::Alarm && was != Status::Alarm)
            .then(|| self.model.contributions(x).ok())
            .flatten();
        let drifted = self.track(score);
        Some(Assessment {
            score,
            status: self.status,
            raised,
            drifted,
        })
    }

    fn track(&mut self, score: f64) -> Option<f64> {
        if self.config.drift_window == 0 || self.model.reference.is_empty() {
            return None;
        }
        if self.recent.len() == self.config.drift_window {
            self.recent.pop_front();
        }
        self.recent.push_back(score);
        self.since_check += 1;
        if self.recent.len() < self.config.drift_window
            || self.since_check < self.config.drift_every.max(1)
        {
            return None;
        }
        self.since_check = 0;
        let p = psi(&self.model.reference, self.recent.iter().copied());
        self.psi = Some(p);
        if !self.drifted && p > self.config.drift_threshold {
            self.drifted = true;
            return Some(p);
        }
        if self.drifted && p < self.config.drift_threshold / 2.0 {
            self.drifted = false;
        }
        None
    }
}

/// Population stability index of `scores` against the bins cut by `edges` (interior
/// edges of a reference distribution with equal mass per bin): Σ (a − e) ln(a / e), with
/// a half-count added to every bin so empty bins stay finite.
pub fn psi(edges: &[f64], scores: impl Iterator<Item = f64>) -> f64 {
    let bins = edges.len() + 1;
    let mut counts = vec![0usize; bins];
    let mut n = 0usize;
    for s in scores {
        counts[edges.partition_point(|e| *e < s)] += 1;
        n += 1;
    }
    let expected = 1.0 / bins as f64;
    let total = n as f64 + 0.5 * bins as f64;
    counts
        .iter()
        .map(|&c| {
            let a = (c as f64 + 0.5) / total;
            (a - expected) * (a / expected).ln()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Algorithm, TrainParams};
    use ndarray::Array2;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    fn features() -> Vec<String> {
        vec!["a.rms".into(), "b.mean".into()]
    }

    fn trained() -> Arc<Model> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let n = Normal::new(0.0, 1.0).unwrap();
        let rows = Array2::from_shape_fn((4000, 2), |_| n.sample(&mut rng));
        let params = TrainParams {
            algorithm: Algorithm::Robust,
            ..TrainParams::default()
        };
        Arc::new(Model::train(&features(), rows.view(), &params).unwrap())
    }

    fn window(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn scores_once_every_feature_is_known_and_holds_the_others() {
        let mut m = Monitor::new(trained(), MonitorConfig::default());
        assert_eq!(m.observe(&window(&[("a.rms", 0.1)])), None);
        assert_eq!(m.observe(&window(&[("c.other", 9.0)])), None);
        let a = m.observe(&window(&[("b.mean", -0.2)])).unwrap();
        assert_eq!(a.status, Status::Ok);
        assert_eq!(a.score, m.model().score(&[0.1, -0.2]).unwrap());
        // Only `a` moves: `b` keeps its latest value.
        let a = m.observe(&window(&[("a.rms", 0.3)])).unwrap();
        assert_eq!(a.score, m.model().score(&[0.3, -0.2]).unwrap());
    }

    #[test]
    fn alarm_needs_consecutive_windows_and_names_the_feature() {
        let mut m = Monitor::new(trained(), MonitorConfig::default());
        m.observe(&window(&[("a.rms", 0.0), ("b.mean", 0.0)]));
        let first = m.observe(&window(&[("b.mean", 12.0)])).unwrap();
        assert_eq!((first.status, first.raised.is_none()), (Status::Warn, true));
        let second = m.observe(&window(&[("b.mean", 12.0)])).unwrap();
        assert_eq!(second.status, Status::Alarm);
        let raised = second.raised.unwrap();
        assert_eq!(raised[0].0, "b.mean");
        assert!(raised[0].1 > 0.9, "{raised:?}");
        // Still in alarm: not raised again, and it holds through low windows until a
        // whole window of three is back below the threshold.
        let third = m.observe(&window(&[("b.mean", 12.0)])).unwrap();
        assert_eq!((third.status, third.raised), (Status::Alarm, None));
        for _ in 0..2 {
            let low = m.observe(&window(&[("b.mean", 0.1)])).unwrap();
            assert_eq!((low.status, low.raised), (Status::Alarm, None));
        }
        let back = m.observe(&window(&[("b.mean", 0.1)])).unwrap();
        assert_eq!(back.status, Status::Ok);
    }

    #[test]
    fn a_lasting_shift_under_the_threshold_raises_a_sustained_alarm() {
        let model = trained();
        let c = model.sustained.expect("trained models calibrate it");
        assert!(
            c.limit >= 1.0 && c.reference > 0.0 && c.reference < 1.0,
            "{c:?}"
        );
        // A shift of b that scores 0.7 of the threshold: never `warn` on its own.
        let shifted = (0..1000)
            .map(|i| f64::from(i) * 0.01)
            .find(|v| model.score(&[0.0, *v]).unwrap() >= 0.7 * model.threshold)
            .unwrap();
        let mut m = Monitor::new(model.clone(), MonitorConfig::default());
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let n = Normal::new(0.0, 1.0).unwrap();
        // Healthy windows raise (almost) nothing...
        let mut raised = 0;
        for _ in 0..10_000 {
            let a = m
                .observe(&window(&[
                    ("a.rms", n.sample(&mut rng)),
                    ("b.mean", n.sample(&mut rng)),
                ]))
                .unwrap();
            raised += usize::from(a.raised.is_some());
        }
        assert!(raised <= 2, "{raised} alarms over 10,000 healthy windows");
        // ...a lasting shift raises one within the number of windows its ratio needs.
        let needed = (c.limit / (0.7 - c.reference)).ceil() as usize + 1;
        let mut first = None;
        for i in 1..=needed + 5 {
            let a = m.observe(&window(&[("b.mean", shifted)])).unwrap();
            assert_ne!(a.status, Status::Warn, "under the threshold");
            if a.status == Status::Alarm {
                first = Some(i);
                assert!(a.raised.is_some());
                break;
            }
        }
        let first = first.expect("a sustained alarm");
        assert!(first <= needed, "after {first} windows, {needed} expected");
        // And it ends once the shift does and the sum drains.
        let mut status = Status::Alarm;
        for _ in 0..200 {
            status = m.observe(&window(&[("b.mean", 0.0)])).unwrap().status;
        }
        assert_eq!(status, Status::Ok);
    }

    #[test]
    fn an_intermittent_fault_raises_one_alarm() {
        let mut m = Monitor::new(trained(), MonitorConfig::default());
        m.observe(&window(&[("a.rms", 0.0), ("b.mean", 0.0)]));
        let mut raised = 0;
        let mut statuses = Vec::new();
        for i in 0..12 {
            let v = if i % 2 == 0 { 12.0 } else { 0.0 };
            let a = m.observe(&window(&[("b.mean", v)])).unwrap();
            raised += usize::from(a.raised.is_some());
            statuses.push(a.status);
        }
        assert_eq!(raised, 1);
        assert_eq!(statuses[0], Status::Warn);
        assert!(
            statuses[2..].iter().all(|s| *s == Status::Alarm),
            "{statuses:?}"
        );
    }

    #[test]
    fn drift_is_reported_once_when_the_scores_shift() {
        let model = trained();
        let config = MonitorConfig {
            drift_window: 200,
            drift_every: 10,
            ..MonitorConfig::default()
        };
        let mut m = Monitor::new(model, config);
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let healthy = Normal::new(0.0, 1.0).unwrap();
        for _ in 0..600 {
            let x = [healthy.sample(&mut rng), healthy.sample(&mut rng)];
            assert_eq!(m.assess(&x).unwrap().drifted, None);
        }
        assert!(m.psi().unwrap() < 0.1, "healthy psi {:?}", m.psi());
        // The asset changes: both features spread 1.6 times wider.
        let wider = Normal::new(0.0, 1.6).unwrap();
        let mut reports = Vec::new();
        for _ in 0..600 {
            let x = [wider.sample(&mut rng), wider.sample(&mut rng)];
            if let Some(p) = m.assess(&x).unwrap().drifted {
                reports.push(p);
            }
        }
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert!(reports[0] > 0.25);
    }

    #[test]
    fn psi_is_zero_for_the_reference_and_grows_with_the_shift() {
        let edges: Vec<f64> = (1..10).map(|i| i as f64).collect();
        let same: Vec<f64> = (0..1000).map(|i| (i % 10) as f64 + 0.5).collect();
        let near_zero = psi(&edges, same.iter().copied());
        assert!(near_zero.abs() < 1e-9, "{near_zero}");
        let shifted: Vec<f64> = same.iter().map(|v| v + 3.0).collect();
        let far: Vec<f64> = same.iter().map(|v| v + 6.0).collect();
        let (p3, p6) = (
            psi(&edges, shifted.iter().copied()),
            psi(&edges, far.iter().copied()),
        );
        assert!(p3 > 0.25 && p6 > p3, "{p3} {p6}");
    }
}
