//! The edge-analysis front end: what a twin keeps of its process signals so that an
//! analysis window can be read in context (e.g. the shaft speed averaged over a vibration
//! window for the bearing stage), and how a completed window's context is filled.
//!
//! The twin (`actors`) and the offline feature runs of `twinmesh eval` (`sim`) both cut
//! windows with [`Analyzer`](crate::chain::Analyzer) and fill their context here, so the
//! evaluation measures the twin's own front end.

use std::collections::{BTreeMap, VecDeque};

use crate::chain::{hold_average, WindowJob};
use crate::kind::AssetKind;

/// Points kept per process signal for window context. A window's context is the
/// time-weighted average over the window, so only the points inside a window (and the
/// one before it) count: 64 cover a minute of a 1 Hz signal, more than any window that
/// reads context (the bearing stage's one-second vibration windows).
pub const CONTEXT_POINTS: usize = 64;

/// Recent points of a twin's process (non-waveform) signals.
#[derive(Debug, Clone, Default)]
pub struct WindowContext {
    recent: BTreeMap<String, VecDeque<(i64, f64)>>,
}

impl WindowContext {
    /// Keeps the samples of a block of `signal` if it is a process signal of `kind`
    /// (waveforms are what windows analyse, never their context).
    pub fn record(
        &mut self,
        kind: AssetKind,
        signal: &str,
        start_ns: i64,
        period_ns: i64,
        samples: &[f64],
    ) {
        if !kind.schema().signal(signal).is_ok_and(|s| !s.waveform) {
            return;
        }
        let recent = self.recent.entry(signal.to_owned()).or_default();
        for (i, v) in samples.iter().enumerate() {
            recent.push_back((start_ns + i as i64 * period_ns, *v));
        }
        while recent.len() > CONTEXT_POINTS {
            recent.pop_front();
        }
    }

    /// Fills `job.context`: one value per reported signal (`(name, last value)`), the
    /// average of its recent points over the window, or its last reported value when no
    /// point is kept (a waveform, or a twin that restarted from its snapshot). A signal
    /// never reported has no context: stages that need it emit none of their context
    /// features.
    pub fn fill<'a>(
        &self,
        job: &mut WindowJob,
        reported: impl IntoIterator<Item = (&'a str, f64)>,
    ) {
        let mut pts: Vec<(i64, f64)> = Vec::with_capacity(CONTEXT_POINTS);
        job.context = reported
            .into_iter()
            .map(|(k, last)| {
                let v = self
                    .recent
                    .get(k)
                    .and_then(|recent| {
                        pts.clear();
                        pts.extend(recent.iter().copied());
                        hold_average(&pts, job.start_ns, job.end_ns)
                    })
                    .unwrap_or(last);
                (k.to_owned(), v)
            })
            .collect();
    }
}

/// The last value of every signal, as a twin reports it (the fallback context of a
/// window, for a front end without a twin's state).
#[derive(Debug, Clone, Default)]
pub struct LastValues(BTreeMap<String, f64>);

impl LastValues {
    /// Records a block's last sample.
    pub fn record(&mut self, signal: &str, samples: &[f64]) {
        if let Some(&v) = samples.last() {
            self.0.insert(signal.to_owned(), v);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{Analyzer, Block, Chain};

    const S: i64 = 1_000_000_000;

    fn job(start_ns: i64, end_ns: i64) -> WindowJob {
        WindowJob {
            signal: "bearing_vibration".into(),
            start_ns,
            end_ns,
            rate_hz: 1.0,
            samples: Vec::new(),
            stages: Vec::new(),
            context: BTreeMap::new(),
            stale_s: 1.0,
        }
    }

    #[test]
    fn context_is_the_window_average_of_process_signals_else_the_last_value() {
        let kind = AssetKind::WindTurbine;
        let mut ctx = WindowContext::default();
        let mut last = LastValues::default();
        for (signal, samples) in [
            ("rotor_speed", vec![10.0, 20.0, 30.0]),
            ("bearing_vibration", vec![0.5, -0.5]),
        ] {
            ctx.record(kind, signal, 0, S, &samples);
            last.record(signal, &samples);
        }
        let mut j = job(S, 3 * S);
        ctx.fill(&mut j, last.iter());
        // rotor_speed: 20 over [1, 2) s, 30 over [2, 3) s; the waveform is not kept, so
        // its context is its last value.
        assert_eq!(j.context["rotor_speed"], 25.0);
        assert_eq!(j.context["bearing_vibration"], -0.5);
        // A signal reported but not kept here (a twin restored from its snapshot).
        let mut j = job(S, 3 * S);
        WindowContext::default().fill(&mut j, [("rotor_speed", 12.0)]);
        assert_eq!(j.context["rotor_speed"], 12.0);
        // Nothing reported: no context.
        let mut j = job(S, 3 * S);
        ctx.fill(&mut j, []);
        assert!(j.context.is_empty());
    }

    #[test]
    fn only_the_last_points_are_kept() {
        let mut ctx = WindowContext::default();
        let samples: Vec<f64> = (0..200).map(f64::from).collect();
        ctx.record(AssetKind::WindTurbine, "rotor_speed", 0, S, &samples);
        assert_eq!(ctx.recent["rotor_speed"].len(), CONTEXT_POINTS);
        // A window the kept points do not cover reads the latest kept value.
        let mut j = job(0, S);
        ctx.fill(&mut j, [("rotor_speed", -1.0)]);
        assert_eq!(j.context["rotor_speed"], 199.0);
        let mut j = job(150 * S, 152 * S);
        ctx.fill(&mut j, [("rotor_speed", -1.0)]);
        assert_eq!(j.context["rotor_speed"], 150.5);
    }

    #[test]
    fn the_default_turbine_chain_reads_its_shaft_speed_from_the_context() {
        let kind = AssetKind::WindTurbine;
        let chain = Chain::default_for(kind);
        let mut analyzer = Analyzer::new(&chain);
        let mut ctx = WindowContext::default();
        let mut last = LastValues::default();
        let rate = kind.schema().signal("bearing_vibration").unwrap().rate_hz;
        let period = (1e9 / rate) as i64;
        let n = (2.0 * rate) as usize;
        let wave: Vec<f64> = (0..n).map(|i| (i as f64 * 0.3).sin()).collect();
        ctx.record(kind, "rotor_speed", 0, S, &[15.0, 15.0, 15.0]);
        last.record("rotor_speed", &[15.0, 15.0, 15.0]);
        let mut jobs = analyzer.push(
            "bearing_vibration",
            Block {
                start_ns: 0,
                period_ns: period,
                samples: wave,
            },
        );
        assert!(!jobs.is_empty());
        for j in &mut jobs {
            ctx.fill(j, last.iter());
            let f = crate::chain::run_window(j);
            assert!(f.contains_key("bearing_vibration.shaft_hz"), "{f:?}");
        }
    }
}
