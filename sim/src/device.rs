//! A simulated device: samples its model at each signal's nominal rate between polls.

use std::collections::BTreeMap;

use twinmesh_actors::ports::{Block, Device};
use twinmesh_twins::dsp::codec::quantize;
use twinmesh_twins::{AssetKind, TwinId};

use crate::model::{new_model, AssetModel, SimError};

/// Most samples one poll produces per signal (bounds work after a long pause).
const MAX_SAMPLES_PER_POLL: i64 = 1 << 20;

pub struct SimDevice {
    twin: TwinId,
    kind: AssetKind,
    model: Box<dyn AssetModel>,
    /// Time of the next sample of each signal.
    next_ns: BTreeMap<&'static str, i64>,
}

impl SimDevice {
    pub fn new(twin: TwinId, kind: AssetKind, seed: u64) -> Result<Self, SimError> {
        let model = new_model(kind, &twin, seed)?;
        Ok(SimDevice {
            twin,
            kind,
            model,
            next_ns: BTreeMap::new(),
        })
    }
}

/// Sample period of a signal in ns.
pub fn period_ns(rate_hz: f64) -> i64 {
    (1e9 / rate_hz).round() as i64
}

impl Device for SimDevice {
    fn twin_id(&self) -> &TwinId {
        &self.twin
    }

    fn kind(&self) -> AssetKind {
        self.kind
    }

    fn poll(&mut self, now_ns: i64) -> Vec<Block> {
        self.model.advance(now_ns);
        let mut blocks = Vec::new();
        for spec in self.kind.schema().signals {
            let period = period_ns(spec.rate_hz);
            // First poll: start on a whole period.
            let start = *self
                .next_ns
                .entry(spec.name)
                .or_insert_with(|| now_ns - now_ns.rem_euclid(period));
            let n = ((now_ns - start) / period + 1).clamp(0, MAX_SAMPLES_PER_POLL);
            if n == 0 || start > now_ns {
                continue;
            }
            let scale = spec.resolution;
            let samples = (0..n)
                .map(|i| quantize(self.model.sample(spec.name, start + i * period), scale))
                .collect();
            self.next_ns.insert(spec.name, start + n * period);
            blocks.push(Block {
                signal: spec.name,
                start_ns: start,
                sample_period_ns: period,
                samples,
                scale: spec.resolution,
            });
        }
        blocks
    }

    fn apply_setpoint(&mut self, property: &str, value: f64) -> Result<(), String> {
        self.kind
            .schema()
            .validate_desired(property, value)
            .map_err(|e| e.to_string())?;
        self.model.set(property, value);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_cover_time_without_gaps_or_overlaps() {
        let id: TwinId = "site-a/wt-01".parse().unwrap();
        let mut d = SimDevice::new(id, AssetKind::WindTurbine, 42).unwrap();
        let t0 = 1_700_000_000_000_000_000i64;
        let mut next: BTreeMap<&str, i64> = BTreeMap::new();
        let mut vib = 0usize;
        for k in 0..25 {
            for b in d.poll(t0 + k * 100_000_000) {
                if let Some(expected) = next.get(b.signal) {
                    assert_eq!(b.start_ns, *expected, "{}", b.signal);
                }
                next.insert(
                    b.signal,
                    b.start_ns + b.samples.len() as i64 * b.sample_period_ns,
                );
                if b.signal == "bearing_vibration" {
                    vib += b.samples.len();
                }
                assert!(b.samples.iter().all(|x| x.is_finite()), "{}", b.signal);
            }
        }
        // 2.4 s of 10 kHz (first poll gives one sample).
        assert_eq!(vib, 24_001);
    }

    #[test]
    fn same_seed_same_samples() {
        let id: TwinId = "site-a/pm-01".parse().unwrap();
        let mut a = SimDevice::new(id.clone(), AssetKind::PowerMeter, 9).unwrap();
        let mut b = SimDevice::new(id, AssetKind::PowerMeter, 9).unwrap();
        for k in 0..5 {
            let t = 1_700_000_000_000_000_000 + k * 100_000_000;
            assert_eq!(a.poll(t), b.poll(t));
        }
    }

    #[test]
    fn set_points_are_range_checked() {
        let id: TwinId = "site-a/wt-01".parse().unwrap();
        let mut d = SimDevice::new(id, AssetKind::WindTurbine, 1).unwrap();
        assert!(d.apply_setpoint("power_limit", 1000.0).is_ok());
        assert_eq!(
            d.apply_setpoint("power_limit", -5.0).unwrap_err(),
            "value -5 of property power_limit is outside [0, 3000]"
        );
    }
}
