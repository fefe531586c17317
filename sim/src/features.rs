//! Offline feature windows: a simulated device run through a kind's default chain the
//! way an edge twin runs it, without a mesh: the same windowing ([`Analyzer`]) and the
//! same window context ([`WindowContext`], the twin's front end), so the evaluation
//! measures the twin's own analysis. Used to train and evaluate
//! anomaly models on known healthy and faulty periods (`twinmesh eval`).

use std::collections::BTreeMap;

use twinmesh_actors::ports::Device;
use twinmesh_twins::chain::{self, Analyzer, Chain};
use twinmesh_twins::window::{LastValues, WindowContext};
use twinmesh_twins::{AssetKind, TwinId};

use crate::device::SimDevice;
use crate::fault::Fault;
use crate::model::SimError;

/// The features of one completed window.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureWindow {
    pub signal: String,
    pub start_ns: i64,
    pub end_ns: i64,
    pub features: BTreeMap<String, f64>,
}

pub struct FeatureRun {
    kind: AssetKind,
    device: SimDevice,
    analyzer: Analyzer,
    context: WindowContext,
    /// The reported value of each signal (a twin's fallback context).
    last: LastValues,
    now_ns: i64,
    step_ns: i64,
    analyse_from_ns: i64,
}

impl FeatureRun {
    /// A device of `kind` (asset `eval/{kind}-{seed}`) with `faults`, polled every second
    /// from `start_ns`.
    pub fn new(
        kind: AssetKind,
        seed: u64,
        faults: &[Fault],
        start_ns: i64,
    ) -> Result<Self, SimError> {
        let twin: TwinId = format!("eval/{}-{seed}", kind.as_str()).parse()?;
        let device = SimDevice::new(twin, kind, seed).with_faults(faults)?;
        Ok(FeatureRun {
            kind,
            device,
            analyzer: Analyzer::new(&Chain::default_for(kind)),
            context: WindowContext::default(),
            last: LastValues::default(),
            now_ns: start_ns,
            step_ns: 1_000_000_000,
            analyse_from_ns: i64::MIN,
        })
    }

    /// Windows that end before `t_ns` are cut but not analysed (fast-forward through a
    /// healthy lead-in whose features are not needed).
    pub fn analyse_from(&mut self, t_ns: i64) {
        self.analyse_from_ns = t_ns;
    }

    /// Simulated time reached.
    pub fn now_ns(&self) -> i64 {
        self.now_ns
    }

    /// Advances one poll (one second); returns the windows it completed, in order.
    pub fn step(&mut self) -> Vec<FeatureWindow> {
        let blocks = self.device.poll(self.now_ns);
        self.now_ns += self.step_ns;
        let mut jobs = Vec::new();
        for b in blocks {
            self.context.record(
                self.kind,
                b.signal,
                b.start_ns,
                b.sample_period_ns,
                &b.samples,
            );
            self.last.record(b.signal, &b.samples);
            if self.analyzer.wants(b.signal) {
                jobs.extend(self.analyzer.push(
                    b.signal,
                    chain::Block {
                        start_ns: b.start_ns,
                        period_ns: b.sample_period_ns,
                        samples: b.samples,
                    },
                ));
            }
        }
        let from = self.analyse_from_ns;
        jobs.into_iter()
            .filter(|job| job.end_ns >= from)
            .map(|mut job| {
                self.context.fill(&mut job, self.last.iter());
                FeatureWindow {
                    signal: job.signal.clone(),
                    start_ns: job.start_ns,
                    end_ns: job.end_ns,
                    features: chain::run_window(&job),
                }
            })
            .collect()
    }

    /// Runs until `count` windows are complete (or `max_steps` polls passed).
    pub fn windows(&mut self, count: usize, max_steps: usize) -> Vec<FeatureWindow> {
        let mut out = Vec::with_capacity(count);
        for _ in 0..max_steps {
            if out.len() >= count {
                break;
            }
            out.extend(self.step());
        }
        out.truncate(count);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_carry_the_default_chain_features() {
        let mut run =
            FeatureRun::new(AssetKind::PowerMeter, 3, &[], 1_700_000_000_000_000_000).unwrap();
        let w = run.windows(4, 10);
        assert_eq!(w.len(), 4);
        assert!(w.iter().all(|w| w.end_ns > w.start_ns));
        let names: Vec<&String> = w.iter().flat_map(|w| w.features.keys()).collect();
        assert!(
            names.iter().any(|n| n.as_str() == "voltage.thd"),
            "{names:?}"
        );
        // Same seed, same features.
        let mut again =
            FeatureRun::new(AssetKind::PowerMeter, 3, &[], 1_700_000_000_000_000_000).unwrap();
        assert_eq!(again.windows(4, 10), w);
    }
}
