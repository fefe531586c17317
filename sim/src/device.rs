//! A simulated device: samples its model at each signal's nominal rate between polls,
//! applies sensor faults, and reports values on the signal's resolution grid (as an ADC
//! would), so frames compress losslessly.

use std::collections::BTreeMap;

use twinmesh_actors::ports::{Block, Device, SetpointOutcome, Sighting};
use twinmesh_twins::dsp::codec::quantize;
use twinmesh_twins::{AssetKind, TwinId};

use crate::fault::{Fault, FaultMode, SensorFaults};
use crate::model::{new_model, AssetModel, SimError};

/// Most samples one poll produces per signal (bounds work after a long pause).
const MAX_SAMPLES_PER_POLL: i64 = 1 << 20;

pub struct SimDevice {
    twin: TwinId,
    kind: AssetKind,
    model: Box<dyn AssetModel>,
    sensors: SensorFaults,
    /// Time of the next sample of each signal.
    next_ns: BTreeMap<&'static str, i64>,
}

impl SimDevice {
    pub fn new(twin: TwinId, kind: AssetKind, seed: u64) -> Self {
        SimDevice {
            model: new_model(kind, &twin, seed),
            twin,
            kind,
            sensors: SensorFaults::default(),
            next_ns: BTreeMap::new(),
        }
    }

    /// Adds faults (validated against the kind) to the device.
    pub fn with_faults(mut self, faults: &[Fault]) -> Result<Self, SimError> {
        for f in faults {
            f.validate(self.kind)?;
            if let FaultMode::Asset(mode) = &f.mode {
                self.model.inject(mode, f.at_ns);
            }
        }
        self.sensors = SensorFaults::new(faults);
        Ok(self)
    }

    /// The value a sensor of `signal` reports at `t_ns` (faults and resolution applied).
    pub fn read(&mut self, signal: &str, t_ns: i64) -> f64 {
        let Ok(spec) = self.kind.schema().signal(signal) else {
            return f64::NAN;
        };
        self.model.advance(t_ns);
        let v = self.model.sample(signal, t_ns);
        let v = self.sensors.apply(signal, spec.max - spec.min, t_ns, v);
        quantize(v.clamp(spec.min, spec.max), spec.resolution)
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
            let range = spec.max - spec.min;
            let samples = (0..n)
                .map(|i| {
                    let t = start + i * period;
                    let v = self.model.sample(spec.name, t);
                    let v = self.sensors.apply(spec.name, range, t, v);
                    quantize(v.clamp(spec.min, spec.max), spec.resolution)
                })
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

    fn sightings(&mut self) -> Vec<Sighting> {
        self.model
            .sightings()
            .into_iter()
            .map(|(stream, timestamp_ns, identifier, present)| Sighting {
                stream,
                timestamp_ns,
                identifier,
                present,
            })
            .collect()
    }

    fn submit_setpoint(
        &mut self,
        _ticket: u64,
        property: &str,
        value: f64,
    ) -> Option<SetpointOutcome> {
        Some(match self.apply_setpoint(property, value) {
            Ok(()) => SetpointOutcome::Delivered,
            Err(reason) => SetpointOutcome::Refused(reason),
        })
    }
}

impl SimDevice {
    /// Applies a set-point at once; `Err` says why the device refused it.
    pub fn apply_setpoint(&mut self, property: &str, value: f64) -> Result<(), String> {
        self.kind
            .schema()
            .validate_desired(property, value)
            .map_err(|e| e.to_string())?;
        self.model.set(property, value);
        Ok(())
    }
}

/// Offline generation (`twinmesh sim`): `n` samples of each of `signals` at `fs`, from
/// `start_ns`, as rows of one value per signal.
pub fn generate(
    device: &mut SimDevice,
    signals: &[&str],
    fs: f64,
    start_ns: i64,
    n: usize,
) -> Vec<Vec<f64>> {
    (0..n)
        .map(|i| {
            let t = start_ns + (i as f64 * 1e9 / fs).round() as i64;
            signals.iter().map(|s| device.read(s, t)).collect()
        })
        .collect()
}

/// A device of a kind twinmesh cannot simulate (one from a Thing Model) with no data
/// source attached: its twin is registered and served, it reports nothing, and it
/// refuses set-points. What a simulated mesh gives a custom kind's asset.
pub struct QuietDevice {
    twin: TwinId,
    kind: AssetKind,
}

impl QuietDevice {
    pub fn new(twin: TwinId, kind: AssetKind) -> Self {
        QuietDevice { twin, kind }
    }
}

impl Device for QuietDevice {
    fn twin_id(&self) -> &TwinId {
        &self.twin
    }

    fn kind(&self) -> AssetKind {
        self.kind
    }

    fn poll(&mut self, _now_ns: i64) -> Vec<Block> {
        Vec::new()
    }

    fn submit_setpoint(
        &mut self,
        _ticket: u64,
        property: &str,
        _value: f64,
    ) -> Option<SetpointOutcome> {
        Some(SetpointOutcome::Refused(format!(
            "{} has no data source: set-point {property} cannot be delivered",
            self.twin
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_cover_time_without_gaps_or_overlaps() {
        let id: TwinId = "site-a/wt-01".parse().unwrap();
        let mut d = SimDevice::new(id, AssetKind::WindTurbine, 42);
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
                // On the resolution grid: every frame packs.
                let mut packed = Vec::new();
                twinmesh_twins::dsp::codec::encode(&b.samples, b.scale, &mut packed);
                assert_eq!(packed[0], 0x02, "{} not on its grid", b.signal);
            }
        }
        // 2.4 s of 10 kHz (first poll gives one sample).
        assert_eq!(vib, 24_001);
    }

    #[test]
    fn every_kind_simulates_plausible_values() {
        let t0 = 1_700_000_000_000_000_000i64;
        for kind in AssetKind::ALL {
            let id = TwinId::new("s", &format!("{}-01", kind.prefix())).unwrap();
            let mut d = SimDevice::new(id, kind, 7);
            for k in 0..30 {
                for b in d.poll(t0 + k * 100_000_000) {
                    let spec = kind.schema().signal(b.signal).unwrap();
                    for x in &b.samples {
                        assert!(
                            x.is_finite() && *x >= spec.min && *x <= spec.max,
                            "{kind}.{}: {x}",
                            b.signal
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn same_seed_same_samples() {
        let id: TwinId = "site-a/pm-01".parse().unwrap();
        let mut a = SimDevice::new(id.clone(), AssetKind::PowerMeter, 9);
        let mut b = SimDevice::new(id, AssetKind::PowerMeter, 9);
        for k in 0..5 {
            let t = 1_700_000_000_000_000_000 + k * 100_000_000;
            assert_eq!(a.poll(t), b.poll(t));
        }
    }

    #[test]
    fn faults_are_validated_and_sensor_faults_apply() {
        let id: TwinId = "site-a/wt-01".parse().unwrap();
        let bad = SimDevice::new(id.clone(), AssetKind::WindTurbine, 1).with_faults(&[Fault {
            mode: "overheating".parse().unwrap(),
            at_ns: 0,
        }]);
        assert!(bad.is_err());
        let mut d = SimDevice::new(id, AssetKind::WindTurbine, 1)
            .with_faults(&[Fault {
                mode: "stuck:power".parse().unwrap(),
                at_ns: 5_000_000_000,
            }])
            .unwrap();
        let t0 = 0;
        let first = d.read("power", t0 + 5_000_000_000);
        for s in 6..60 {
            assert_eq!(d.read("power", s * 1_000_000_000), first);
        }
    }

    #[test]
    fn set_points_are_range_checked() {
        let id: TwinId = "site-a/wt-01".parse().unwrap();
        let mut d = SimDevice::new(id, AssetKind::WindTurbine, 1);
        assert!(d.apply_setpoint("power_limit", 1000.0).is_ok());
        assert_eq!(
            d.apply_setpoint("power_limit", -5.0).unwrap_err(),
            "value -5 of property power_limit is outside [0, 3000]"
        );
    }
}
