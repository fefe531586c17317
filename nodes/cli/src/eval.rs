//! `twinmesh eval`: how well each anomaly algorithm detects each simulator fault
//! (EVALUATION.md). Per kind, a model per algorithm is trained on the first healthy
//! windows of one simulated asset (a twin's model is its own); the windows after them
//! count false alarms; for every fault mode, the same asset runs again, the fault starts
//! after the training period, and the delay to the first alarm is counted in windows. Windows and scoring are the edge twin's own: the kind's default
//! chain cut by [`twinmesh_twins::chain::Analyzer`], one score per feature window
//! ([`twinmesh_twins::monitor::Monitor`]: an alarm when two of the last three windows
//! score above the threshold).
//!
//! `--out DIR` also writes the feature matrices as CSV for `scripts/models/sklearn_eval.py`,
//! which runs scikit-learn's algorithms on the very same rows.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use ndarray::Array2;

use twinmesh_sim::fault::kind_faults;
use twinmesh_sim::features::FeatureRun;
use twinmesh_sim::{Fault, FaultMode};
use twinmesh_twins::chain::Chain;
use twinmesh_twins::model::{Algorithm, Model, TrainParams};
use twinmesh_twins::monitor::{FeatureVector, Monitor, MonitorConfig, Status};
use twinmesh_twins::{AssetKind, Tier};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Kinds to evaluate (default: all).
    #[arg(long, value_delimiter = ',')]
    pub kinds: Vec<AssetKind>,
    /// Algorithms to compare.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "pca,pca_normal,ensemble,robust,isolation_forest"
    )]
    pub algorithms: Vec<Algorithm>,
    /// Healthy windows to train on (at least; see `--train-hours`).
    #[arg(long, default_value_t = 5000)]
    pub train: usize,
    /// Hours of healthy operation to train on at least (default: the kind's training
    /// span, long enough to see its operating regimes: 12 h for a wind turbine, 6 h for a
    /// spindle, a day for the others; 5,000 one-second windows are under an hour and a
    /// half). 0: `--train` windows for every kind.
    #[arg(long)]
    pub train_hours: Option<f64>,
    /// Healthy windows of another asset that count false alarms.
    #[arg(long, default_value_t = 10_000)]
    pub healthy: usize,
    /// Windows watched after a fault's onset before it counts as missed.
    #[arg(long, default_value_t = 100)]
    pub horizon: usize,
    /// Alarm-threshold quantile of the training scores for every algorithm (default:
    /// each algorithm's own, as `ctl train` uses).
    #[arg(long)]
    pub quantile: Option<f64>,
    /// Also print, for every fault and algorithm, score / threshold of the first N
    /// windows after the onset and the features that contribute most to the first of
    /// them (to see why a fault is caught late or missed).
    #[arg(long, default_value_t = 0)]
    pub trace: usize,
    /// Seed of the simulated assets.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Directory for the feature matrices as CSV (for the scikit-learn comparison, and
    /// for `--from`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Evaluate on the feature matrices an earlier `--out DIR` wrote instead of
    /// simulating (seconds instead of minutes: to measure a model change on the very same
    /// rows). `--train`, `--train-hours`, `--healthy`, `--horizon` and `--seed` are those
    /// of that run.
    #[arg(long, conflicts_with_all = ["out", "train_hours", "seed"])]
    pub from: Option<PathBuf>,
}

const START_NS: i64 = 1_767_225_600_000_000_000; // 2026-01-01T00:00:00Z
/// Healthy windows before a fault's onset.
const LEAD_WINDOWS: usize = 50;

/// Feature rows of one run, with the flag "after the fault's onset".
struct Rows {
    names: Vec<String>,
    rows: Vec<Vec<f64>>,
    after_onset: Vec<bool>,
    end_ns: Vec<i64>,
}

impl Rows {
    fn push(&mut self, x: Vec<f64>, after_onset: bool, end_ns: i64) {
        self.rows.push(x);
        self.after_onset.push(after_onset);
        self.end_ns.push(end_ns);
    }

    fn split_at(mut self, n: usize) -> (Rows, Rows) {
        let rest = Rows {
            names: self.names.clone(),
            rows: self.rows.split_off(n),
            after_onset: self.after_onset.split_off(n),
            end_ns: self.end_ns.split_off(n),
        };
        (self, rest)
    }
}

impl Rows {
    fn write_csv(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let mut w = csv::Writer::from_path(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut header = vec!["after_onset".to_owned()];
        header.extend(self.names.iter().cloned());
        w.write_record(&header)?;
        for (r, a) in self.rows.iter().zip(&self.after_onset) {
            let mut rec = vec![u8::from(*a).to_string()];
            rec.extend(r.iter().map(|v| format!("{v:e}")));
            w.write_record(&rec)?;
        }
        w.flush()?;
        Ok(())
    }

    /// Reads what [`Rows::write_csv`] wrote; `names`: the columns it must have.
    fn read_csv(path: &Path, names: Option<&[String]>) -> anyhow::Result<Rows> {
        let mut r = csv::Reader::from_path(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let header: Vec<String> = r.headers()?.iter().map(str::to_owned).collect();
        anyhow::ensure!(
            header.first().map(String::as_str) == Some("after_onset"),
            "{}: the first column must be after_onset",
            path.display()
        );
        let found = &header[1..];
        if let Some(names) = names {
            anyhow::ensure!(
                found == names,
                "{}: its columns are not those of train.csv",
                path.display()
            );
        }
        let mut rows = Rows {
            names: found.to_vec(),
            rows: Vec::new(),
            after_onset: Vec::new(),
            end_ns: Vec::new(),
        };
        for (i, rec) in r.records().enumerate() {
            let rec = rec.with_context(|| format!("{}: row {}", path.display(), i + 1))?;
            let x = rec
                .iter()
                .skip(1)
                .map(str::parse::<f64>)
                .collect::<Result<Vec<f64>, _>>()
                .with_context(|| format!("{}: row {}: not a number", path.display(), i + 1))?;
            anyhow::ensure!(
                x.len() == rows.names.len(),
                "{}: row {} has {} values for {} columns",
                path.display(),
                i + 1,
                x.len(),
                rows.names.len()
            );
            // The CSV keeps no times: what needs them (spacing, training hours) comes from
            // summary.json.
            rows.push(x, rec.get(0) == Some("1"), 0);
        }
        Ok(rows)
    }
}

/// Window lengths of the kind's default chain's edge stages, in seconds.
fn window_lengths_s(kind: AssetKind) -> impl Iterator<Item = f64> {
    Chain::default_for(kind)
        .stages
        .into_iter()
        .filter(|s| s.tier == Tier::Edge && s.window > 0)
        .filter_map(move |s| {
            let rate = kind.schema().signal(&s.signal).ok()?.rate_hz;
            Some(s.window as f64 / rate)
        })
}

/// Longest window of the kind's default chain's edge stages, in seconds.
fn longest_window_s(kind: AssetKind) -> f64 {
    window_lengths_s(kind).fold(1.0, f64::max)
}

/// Hours of operation to train `kind` on at least: `--train-hours` or the kind's span.
fn training_hours(kind: AssetKind, args: &EvalArgs) -> f64 {
    args.train_hours
        .unwrap_or(kind.schema().training_span_s as f64 / 3600.0)
}

/// Runs a healthy device and collects feature vectors (the first full one and then one
/// per window), over every feature its first windows produce: training rows until there
/// are at least `train_min` of them and they reach `train_until_ns`, then `healthy` more.
fn collect(
    kind: AssetKind,
    seed: u64,
    train_min: usize,
    train_until_ns: i64,
    healthy: usize,
) -> anyhow::Result<(Rows, Rows)> {
    let mut run = FeatureRun::new(kind, seed, &[], START_NS)?;
    // Time enough for every row at a quarter of the slowest window's rate.
    let limit_ns = train_until_ns
        + ((train_min + healthy) as f64 * longest_window_s(kind) * 4e9) as i64
        + 60_000_000_000;
    let mut rows = Rows {
        names: Vec::new(),
        rows: Vec::new(),
        after_onset: Vec::new(),
        end_ns: Vec::new(),
    };
    // Training rows, once known: the first index past both bounds.
    let mut split: Option<usize> = None;
    let mut vector: Option<FeatureVector> = None;
    let mut pending: Vec<_> = Vec::new();
    while split.is_none_or(|n| rows.rows.len() < n + healthy) {
        anyhow::ensure!(
            run.now_ns() < limit_ns,
            "{kind}: only {} windows by {:.1} h of operation",
            rows.rows.len(),
            (run.now_ns() - START_NS) as f64 / 3.6e12
        );
        let windows = run.step();
        if vector.is_none() {
            // Learn the feature names from the first minutes: every feature any window
            // produced once each edge stage completed a window.
            pending.extend(windows);
            if run.now_ns() - START_NS < (longest_window_s(kind) * 2e9) as i64 + 2_000_000_000 {
                continue;
            }
            let mut all: Vec<String> = pending
                .iter()
                .flat_map(|w: &twinmesh_sim::features::FeatureWindow| w.features.keys().cloned())
                .collect();
            all.sort();
            all.dedup();
            vector = Some(FeatureVector::new(&all));
            rows.names = all;
        } else {
            pending.extend(windows);
        }
        let v = vector.as_mut().expect("set");
        for w in pending.drain(..) {
            if let Some(x) = v.update(&w.features) {
                rows.push(x, false, w.end_ns);
                let n = rows.rows.len();
                if split.is_none() && n >= train_min && w.end_ns >= train_until_ns {
                    split = Some(n);
                }
            }
        }
    }
    let split = split.expect("the loop ends once the training rows are known");
    let count = split + healthy;
    rows.rows.truncate(count);
    rows.after_onset.truncate(count);
    rows.end_ns.truncate(count);
    Ok(rows.split_at(split))
}

/// The fault modes evaluated for `kind`: its asset faults, and a drifting and a stuck
/// sensor on the first signal its chain analyses at the edge.
fn fault_modes(kind: AssetKind) -> Vec<FaultMode> {
    let mut modes: Vec<FaultMode> = kind_faults(kind)
        .iter()
        .map(|m| FaultMode::Asset((*m).to_owned()))
        .collect();
    if let Some(s) = Chain::default_for(kind)
        .stages
        .iter()
        .find(|s| s.tier == Tier::Edge && s.window > 0)
    {
        modes.push(FaultMode::Drift(s.signal.clone()));
        modes.push(FaultMode::Stuck(s.signal.clone()));
    }
    modes
}

/// Windows after onset until the first alarm (1 = the first window after onset).
fn detection_delay(model: &Arc<Model>, rows: &Rows) -> Option<usize> {
    let mut m = Monitor::new(model.clone(), MonitorConfig::default());
    let mut after = 0;
    for (x, a) in rows.rows.iter().zip(&rows.after_onset) {
        let status = m.assess(x).map(|a| a.status);
        if *a {
            after += 1;
            if status == Some(Status::Alarm) {
                return Some(after);
            }
        }
    }
    None
}

/// Score over threshold of the first `n` windows after the onset, and the three
/// largest contributions to the first of them.
fn trace(
    kind: AssetKind,
    mode: &str,
    alg: Algorithm,
    model: &Model,
    rows: &Rows,
    n: usize,
) -> String {
    let after: Vec<&Vec<f64>> = rows
        .rows
        .iter()
        .zip(&rows.after_onset)
        .filter(|(_, a)| **a)
        .map(|(x, _)| x)
        .take(n)
        .collect();
    let ratios: Vec<String> = after
        .iter()
        .map(|x| {
            model.score(x).map_or("error".to_owned(), |s| {
                format!("{:.2}", s / model.threshold)
            })
        })
        .collect();
    let top = after
        .first()
        .and_then(|x| model.contributions(x).ok())
        .map(|c| top_features(&c))
        .unwrap_or_default();
    format!(
        "{kind} {mode} {alg}: score/threshold {}; first window: {top}",
        ratios.join(" ")
    )
}

/// The three largest contributions, as `feature share, ...`.
fn top_features(parts: &[(String, f64)]) -> String {
    parts
        .iter()
        .take(3)
        .map(|(f, v)| format!("{f} {v:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Alarms raised (transitions into `alarm`) over healthy windows, and the windows in
/// alarm (an alarm raised once and held for the rest counts 1 raised, every window in
/// alarm). With `trace`, each one's window, score / threshold and largest contributions go to
/// stderr.
fn false_alarms(model: &Arc<Model>, rows: &Rows, trace: bool) -> (usize, usize) {
    let mut m = Monitor::new(model.clone(), MonitorConfig::default());
    let mut was = Status::Ok;
    let (mut raised, mut in_alarm) = (0, 0);
    for (i, x) in rows.rows.iter().enumerate() {
        if let Some(a) = m.assess(x) {
            if let (true, Some(parts)) = (trace, &a.raised) {
                eprintln!(
                    "{} false alarm at healthy window {i}: score/threshold {:.2}; {}",
                    model.algorithm,
                    a.score / model.threshold,
                    top_features(parts)
                );
            }
            raised += usize::from(a.status == Status::Alarm && was != Status::Alarm);
            in_alarm += usize::from(a.status == Status::Alarm);
            was = a.status;
        }
    }
    (raised, in_alarm)
}

fn matrix(rows: &Rows) -> Array2<f64> {
    let d = rows.names.len();
    Array2::from_shape_fn((rows.rows.len(), d), |(i, j)| rows.rows[i][j])
}

struct KindResult {
    kind: AssetKind,
    features: usize,
    train_rows: usize,
    /// Hours of operation the training windows cover.
    train_hours: f64,
    /// Mean time between the healthy windows (the unit of the delays), s.
    window_s: f64,
    /// (row label, one cell per algorithm)
    rows: Vec<(String, Vec<String>)>,
    seconds: f64,
}

/// The feature rows of one kind: training, healthy, and one run per fault mode.
struct Recorded {
    train: Rows,
    healthy: Rows,
    /// `(mode, rows)`, `mode` as `FaultMode` prints it.
    faults: Vec<(String, Rows)>,
    /// Hours of operation the training windows cover, and the mean window spacing of the
    /// healthy windows (NaN: unknown).
    train_hours: f64,
    window_s: f64,
}

/// What `--out` writes next to the CSV files: what the rows themselves do not say.
#[derive(serde::Serialize, serde::Deserialize)]
struct Summary {
    train_hours: f64,
    window_s: f64,
    /// Fault modes, in order; each one's rows are in `fault_{mode with ':' as '_'}.csv`.
    faults: Vec<String>,
}

fn fault_file(mode: &str) -> String {
    format!("fault_{}.csv", mode.replace(':', "_"))
}

/// Simulates one asset of `kind` (see the module documentation).
fn simulate(kind: AssetKind, args: &EvalArgs) -> anyhow::Result<Recorded> {
    // One asset: its first windows train, the ones after them count false alarms, and
    // each fault run is the same asset (same seed: the same samples up to the onset).
    let seed = args.seed.wrapping_mul(1000) + kind.index() as u64;
    let train_until_ns = START_NS + (training_hours(kind, args) * 3.6e12) as i64;
    let (train, healthy) = collect(kind, seed, args.train, train_until_ns, args.healthy)?;
    let window_ns = (longest_window_s(kind) * 1e9) as i64;
    let train_end_ns = *train.end_ns.last().expect("training rows");
    let onset_ns = train_end_ns + LEAD_WINDOWS as i64 * window_ns;
    let mut faults = Vec::new();
    for mode in fault_modes(kind) {
        let fault = Fault {
            mode: mode.clone(),
            at_ns: onset_ns,
        };
        let run =
            collect_until_after(kind, seed, &fault, &train.names, train_end_ns, args.horizon)?;
        faults.push((mode.to_string(), run));
    }
    let window_s = match (healthy.end_ns.first(), healthy.end_ns.last()) {
        (Some(a), Some(b)) if healthy.end_ns.len() > 1 => {
            (b - a) as f64 / 1e9 / (healthy.end_ns.len() - 1) as f64
        }
        _ => f64::NAN,
    };
    Ok(Recorded {
        train_hours: (train_end_ns - START_NS) as f64 / 3.6e12,
        window_s,
        train,
        healthy,
        faults,
    })
}

/// Writes `rec` as `--out` does: `train.csv`, `healthy.csv`, a `fault_*.csv` per mode
/// and `summary.json`, in `dir`.
fn write_recorded(rec: &Recorded, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    rec.train.write_csv(&dir.join("train.csv"))?;
    rec.healthy.write_csv(&dir.join("healthy.csv"))?;
    for (mode, rows) in &rec.faults {
        rows.write_csv(&dir.join(fault_file(mode)))?;
    }
    let summary = Summary {
        train_hours: rec.train_hours,
        window_s: rec.window_s,
        faults: rec.faults.iter().map(|(m, _)| m.clone()).collect(),
    };
    let path = dir.join("summary.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Reads what [`write_recorded`] wrote in `dir`.
fn read_recorded(dir: &Path) -> anyhow::Result<Recorded> {
    let path = dir.join("summary.json");
    let summary: Summary = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{}: not an evaluation summary", path.display()))?;
    let train = Rows::read_csv(&dir.join("train.csv"), None)?;
    let healthy = Rows::read_csv(&dir.join("healthy.csv"), Some(&train.names))?;
    let faults = summary
        .faults
        .iter()
        .map(|m| {
            Ok((
                m.clone(),
                Rows::read_csv(&dir.join(fault_file(m)), Some(&train.names))?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(
        train.rows.len() >= 2 && !healthy.rows.is_empty(),
        "{}: too few training or healthy rows",
        dir.display()
    );
    Ok(Recorded {
        train,
        healthy,
        faults,
        train_hours: summary.train_hours,
        window_s: summary.window_s,
    })
}

fn evaluate_kind(kind: AssetKind, args: &EvalArgs) -> anyhow::Result<KindResult> {
    let t0 = Instant::now();
    let rec = match &args.from {
        Some(dir) => read_recorded(&dir.join(kind.as_str()))?,
        None => simulate(kind, args)?,
    };
    if let Some(dir) = &args.out {
        write_recorded(&rec, &dir.join(kind.as_str()))?;
    }
    let names = rec.train.names.clone();
    let x = matrix(&rec.train);
    let mut models = Vec::new();
    for &alg in &args.algorithms {
        let mut params = TrainParams::for_algorithm(alg);
        if let Some(q) = args.quantile {
            params.quantile = q;
        }
        let m = Model::train(&names, x.view(), &params)
            .with_context(|| format!("{kind}: training {alg}"))?;
        models.push(Arc::new(m));
    }
    let counts: Vec<(usize, usize)> = models
        .iter()
        .map(|m| false_alarms(m, &rec.healthy, args.trace > 0))
        .collect();
    let healthy_n = rec.healthy.rows.len();
    let per_10k = |n: usize| format!("{:.1}", n as f64 * 10_000.0 / healthy_n as f64);
    let mut rows = vec![
        (
            "false alarms raised / 10,000 healthy windows".to_owned(),
            counts.iter().map(|c| per_10k(c.0)).collect(),
        ),
        (
            "healthy windows in alarm / 10,000".to_owned(),
            counts.iter().map(|c| per_10k(c.1)).collect(),
        ),
    ];
    for (mode, run) in &rec.faults {
        if args.trace > 0 {
            for (m, alg) in models.iter().zip(&args.algorithms) {
                eprintln!("{}", trace(kind, mode, *alg, m, run, args.trace));
            }
        }
        let watched = run.after_onset.iter().filter(|a| **a).count();
        rows.push((
            format!("delay, `{mode}` (windows)"),
            models
                .iter()
                .map(|m| match detection_delay(m, run) {
                    Some(d) => d.to_string(),
                    None => format!("missed (> {watched})"),
                })
                .collect(),
        ));
    }
    Ok(KindResult {
        kind,
        features: names.len(),
        train_rows: rec.train.rows.len(),
        train_hours: rec.train_hours,
        window_s: rec.window_s,
        rows,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Windows of a faulty run until `horizon` windows after the onset.
fn collect_until_after(
    kind: AssetKind,
    seed: u64,
    fault: &Fault,
    names: &[String],
    analyse_from_ns: i64,
    horizon: usize,
) -> anyhow::Result<Rows> {
    let onset_ns = fault.at_ns;
    let mut run = FeatureRun::new(kind, seed, std::slice::from_ref(fault), START_NS)?;
    run.analyse_from(analyse_from_ns);
    let mut vector = FeatureVector::new(names);
    let mut rows = Rows {
        names: names.to_vec(),
        rows: Vec::new(),
        after_onset: Vec::new(),
        end_ns: Vec::new(),
    };
    let limit_ns = onset_ns + ((horizon as f64 + 2.0) * longest_window_s(kind) * 4e9) as i64;
    while rows.after_onset.iter().filter(|a| **a).count() < horizon {
        anyhow::ensure!(
            run.now_ns() < limit_ns,
            "{kind}: `{}` produced too few windows after its onset",
            fault.mode
        );
        for w in run.step() {
            if let Some(x) = vector.update(&w.features) {
                rows.push(x, w.end_ns > onset_ns, w.end_ns);
            }
        }
    }
    Ok(rows)
}

pub fn run(args: EvalArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    anyhow::ensure!(args.train >= 10, "--train needs at least 10 windows");
    if let Some(h) = args.train_hours {
        anyhow::ensure!(
            h.is_finite() && (0.0..=1000.0).contains(&h),
            "--train-hours must be between 0 and 1000"
        );
    }
    anyhow::ensure!(
        args.healthy >= 1 && args.horizon >= 1,
        "--healthy and --horizon must be positive"
    );
    let kinds = match (&args.from, args.kinds.is_empty()) {
        (_, false) => args.kinds.clone(),
        // The kinds that run recorded.
        (Some(dir), true) => {
            let kinds: Vec<AssetKind> = AssetKind::ALL
                .into_iter()
                .filter(|k| dir.join(k.as_str()).join("summary.json").is_file())
                .collect();
            anyhow::ensure!(
                !kinds.is_empty(),
                "{}: no kind's summary.json (written by `twinmesh eval --out`)",
                dir.display()
            );
            kinds
        }
        (None, true) => AssetKind::ALL.to_vec(),
    };
    let t0 = Instant::now();
    // One thread per kind; the OS shares the cores.
    let results: Vec<anyhow::Result<KindResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = kinds
            .iter()
            .map(|&k| {
                let args = &args;
                s.spawn(move || {
                    let r = evaluate_kind(k, args);
                    if let Ok(r) = &r {
                        eprintln!("{k}: done in {:.0} s", r.seconds);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("evaluation thread panicked")))
            })
            .collect()
    });
    let algs: Vec<String> = args.algorithms.iter().map(|a| a.to_string()).collect();
    let trained = match &args.from {
        Some(dir) => format!(
            "Feature rows recorded in {} by `twinmesh eval --out`: one simulated asset per \
             kind, trained on its first windows, false alarms over its next",
            dir.display()
        ),
        None => format!(
            "One simulated asset per kind: trained on its first {} windows or {}, whichever \
             is more; false alarms over its next {} windows",
            args.train,
            match args.train_hours {
                Some(h) => format!("{h} hours"),
                None => "the kind's training span".to_owned(),
            },
            args.healthy
        ),
    };
    writeln!(
        out,
        "{trained}; each fault starts {LEAD_WINDOWS} windows after the training period; an \
         alarm is raised when {} of the last {} windows score above the threshold or the \
         sustained-shift sum passes its limit.\n",
        MonitorConfig::default().alarm_after,
        MonitorConfig::default().alarm_window
    )?;
    for r in results {
        let r = r?;
        writeln!(
            out,
            "### {} ({} features, {} training windows over {:.0} h; a window every {:.1} s)\n",
            r.kind, r.features, r.train_rows, r.train_hours, r.window_s
        )?;
        writeln!(out, "| | {} |", algs.join(" | "))?;
        writeln!(out, "|---|{}", "---|".repeat(algs.len()))?;
        for (label, cells) in &r.rows {
            writeln!(out, "| {label} | {} |", cells.join(" | "))?;
        }
        writeln!(out)?;
    }
    eprintln!("evaluation took {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        eval: EvalArgs,
    }

    fn args(line: &[&str]) -> EvalArgs {
        Cli::try_parse_from(std::iter::once("eval").chain(line.iter().copied()))
            .expect("arguments")
            .eval
    }

    /// The per-kind tables (after the introduction).
    fn tables(out: &[u8]) -> String {
        let text = String::from_utf8(out.to_vec()).expect("utf-8");
        text.split_once("\n\n")
            .expect("an introduction")
            .1
            .to_owned()
    }

    #[test]
    fn recorded_rows_give_the_table_of_the_run_that_recorded_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let small = [
            "--kinds",
            "wifi_ap",
            "--algorithms",
            "pca,robust",
            "--train",
            "300",
            "--train-hours",
            "0",
            "--healthy",
            "200",
            "--horizon",
            "10",
        ];
        let mut line = small.to_vec();
        let out_dir = dir.path().to_str().expect("utf-8 path");
        line.extend(["--out", out_dir]);
        let mut simulated = Vec::new();
        run(args(&line), &mut simulated).expect("simulated run");
        let kind_dir = dir.path().join("wifi_ap");
        for f in [
            "train.csv",
            "healthy.csv",
            "summary.json",
            "fault_outage.csv",
        ] {
            assert!(kind_dir.join(f).is_file(), "{f} written");
        }

        let mut recorded = Vec::new();
        run(
            args(&[
                "--algorithms",
                "pca,robust",
                "--from",
                dir.path().to_str().expect("utf-8 path"),
            ]),
            &mut recorded,
        )
        .expect("recorded run");
        let table = tables(&simulated);
        assert!(table.contains("delay, `outage` (windows)"), "{table}");
        assert_eq!(tables(&recorded), table);

        // A recorded file that lost a column is refused with its name, not misread.
        let healthy = kind_dir.join("healthy.csv");
        let text = std::fs::read_to_string(&healthy).expect("healthy.csv");
        let cut: String = text
            .lines()
            .map(|l| l.rsplit_once(',').expect("columns").0.to_owned() + "\n")
            .collect();
        std::fs::write(&healthy, cut).expect("write");
        let err = run(
            args(&["--from", dir.path().to_str().expect("utf-8 path")]),
            &mut Vec::new(),
        )
        .expect_err("a cut file");
        assert!(
            format!("{err:#}").contains("healthy.csv: its columns are not those of train.csv"),
            "{err:#}"
        );
    }
}
