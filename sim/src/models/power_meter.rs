//! A feeder power meter: 50 Hz voltage and current waveforms with configured harmonic
//! content, and a household energy counter following a daily load profile. Faults:
//! `harmonic_distortion` (a non-linear load: strong 5th and 7th harmonics), `sag`
//! (voltage at 70 % for 200 ms every 2 s) and `swell` (voltage at 115 % for 200 ms every
//! 2 s).

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use twinmesh_twins::AssetKind;

use super::{hour_of, secs, Base, PerSecond};

pub const MAINS_HZ: f64 = 50.0;
pub const VOLTAGE_RMS: f64 = 230.0;
/// Voltage harmonics as (order, amplitude relative to the fundamental).
pub const VOLTAGE_HARMONICS: [(u32, f64); 3] = [(3, 0.02), (5, 0.03), (7, 0.01)];
/// Extra voltage harmonics under the `harmonic_distortion` fault.
pub const DISTORTION_HARMONICS: [(u32, f64); 2] = [(5, 0.06), (7, 0.04)];
/// Current harmonics of a rectifier-heavy household load.
pub const CURRENT_HARMONICS: [(u32, f64); 3] = [(3, 0.10), (5, 0.06), (7, 0.03)];

/// THD (ratio) of a set of harmonics relative to a unit fundamental.
pub fn configured_thd(harmonics: &[(u32, f64)]) -> f64 {
    harmonics.iter().map(|(_, a)| a * a).sum::<f64>().sqrt()
}

pub struct PowerMeter {
    rng: ChaCha8Rng,
    noise: Normal<f64>,
    /// Household base load in kW (varies per household).
    base_kw: f64,
    load_kw: f64,
    demand_limit: f64,
    energy_kwh: f64,
    base: Base,
}

/// Relative daily load profile (1.0 = base) by hour of the day, UTC.
fn daily_profile(hour: f64) -> f64 {
    let morning = (-((hour - 7.5) / 1.5).powi(2)).exp();
    let evening = (-((hour - 19.0) / 2.0).powi(2)).exp();
    0.4 + 0.8 * morning + 1.4 * evening
}

impl PowerMeter {
    pub fn new(mut rng: ChaCha8Rng) -> Self {
        let base_kw = rng.random_range(0.8..2.5);
        PowerMeter {
            rng,
            noise: Normal::new(0.0, 1.0).expect("valid normal"),
            base_kw,
            load_kw: base_kw,
            demand_limit: 20.0,
            energy_kwh: 0.0,
            base: Base::default(),
        }
    }

    fn waveform(rms: f64, harmonics: &[(u32, f64)], phase_shift: f64, t: f64) -> f64 {
        let peak = rms * std::f64::consts::SQRT_2;
        let w = std::f64::consts::TAU * MAINS_HZ;
        let mut v = (w * t - phase_shift).sin();
        for &(order, rel) in harmonics {
            v += rel * (f64::from(order) * (w * t - phase_shift)).sin();
        }
        peak * v
    }

    /// The voltage harmonics in effect at `t_ns`.
    pub fn voltage_harmonics(&self, t_ns: i64) -> Vec<(u32, f64)> {
        let mut h = VOLTAGE_HARMONICS.to_vec();
        if self.base.faults.on("harmonic_distortion", t_ns) {
            for (order, a) in DISTORTION_HARMONICS {
                if let Some(e) = h.iter_mut().find(|(o, _)| *o == order) {
                    e.1 += a;
                }
            }
        }
        h
    }
}

impl PowerMeter {
    /// The voltage relative to nominal at `t_ns`: 0.7 during a sag's and 1.15 during a
    /// swell's 200 ms of every 2 s.
    pub fn voltage_scale(&self, t_ns: i64) -> f64 {
        if secs(t_ns) % 2.0 >= 0.2 {
            1.0
        } else if self.base.faults.on("sag", t_ns) {
            0.7
        } else if self.base.faults.on("swell", t_ns) {
            1.15
        } else {
            1.0
        }
    }
}

impl PerSecond for PowerMeter {
    const KIND: AssetKind = AssetKind::PowerMeter;

    fn base(&mut self) -> &mut Base {
        &mut self.base
    }

    fn step(&mut self, s: i64) {
        let jitter = 1.0 + 0.05 * self.noise.sample(&mut self.rng);
        self.load_kw =
            (self.base_kw * daily_profile(hour_of(s)) * jitter).clamp(0.05, self.demand_limit);
        self.energy_kwh += self.load_kw / 3600.0;
    }

    fn value(&mut self, signal: &str, t_ns: i64) -> f64 {
        let t = secs(t_ns);
        match signal {
            "voltage" => {
                self.voltage_scale(t_ns)
                    * Self::waveform(VOLTAGE_RMS, &self.voltage_harmonics(t_ns), 0.0, t)
            }
            "current" => {
                let irms = self.load_kw * 1000.0 / VOLTAGE_RMS;
                // Lagging power factor of 0.95.
                Self::waveform(irms, &CURRENT_HARMONICS, 0.95f64.acos(), t)
            }
            "household_energy" => self.energy_kwh,
            _ => f64::NAN,
        }
    }

    fn set_point(&mut self, property: &str, value: f64) {
        if property == "demand_limit" {
            self.demand_limit = value.max(0.05);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AssetModel;
    use rand::SeedableRng;

    #[test]
    fn voltage_rms_matches_configuration() {
        let mut pm = PowerMeter::new(ChaCha8Rng::seed_from_u64(3));
        let fs = 6400.0;
        let n = 6400; // one second = 50 whole cycles
        let sum_sq: f64 = (0..n)
            .map(|i| pm.sample("voltage", (i as f64 / fs * 1e9) as i64).powi(2))
            .sum();
        let rms = (sum_sq / n as f64).sqrt();
        let expected = VOLTAGE_RMS * (1.0 + configured_thd(&VOLTAGE_HARMONICS).powi(2)).sqrt();
        assert!(
            (rms - expected).abs() < 1e-6 * expected,
            "{rms} vs {expected}"
        );
    }

    #[test]
    fn energy_counter_increases_and_distortion_raises_thd() {
        let mut pm = PowerMeter::new(ChaCha8Rng::seed_from_u64(3));
        pm.advance(0);
        let e0 = pm.sample("household_energy", 0);
        pm.advance(3_600_000_000_000);
        let e1 = pm.sample("household_energy", 3_600_000_000_000);
        assert!(e1 > e0 + 0.04, "{e0} -> {e1}");
        pm.inject("harmonic_distortion", 10);
        assert!(
            configured_thd(&pm.voltage_harmonics(11)) > 2.0 * configured_thd(&VOLTAGE_HARMONICS)
        );
        assert_eq!(pm.voltage_harmonics(9), VOLTAGE_HARMONICS.to_vec());
    }

    /// RMS voltage over `[from_s, from_s + 0.2)`, a whole number of mains cycles.
    fn rms_over(pm: &mut PowerMeter, from_s: f64) -> f64 {
        let n = 1280;
        let sum_sq: f64 = (0..n)
            .map(|i| {
                let t = from_s + i as f64 / 6400.0;
                pm.sample("voltage", (t * 1e9).round() as i64).powi(2)
            })
            .sum();
        (sum_sq / f64::from(n)).sqrt()
    }

    #[test]
    fn sags_and_swells_change_the_voltage_for_200_ms_of_every_2_s() {
        let healthy = rms_over(&mut PowerMeter::new(ChaCha8Rng::seed_from_u64(3)), 10.0);
        for (mode, scale) in [("sag", 0.7), ("swell", 1.15)] {
            let mut pm = PowerMeter::new(ChaCha8Rng::seed_from_u64(3));
            pm.inject(mode, 5_000_000_000);
            let during = rms_over(&mut pm, 10.0);
            assert!(
                (during / healthy - scale).abs() < 1e-6,
                "{mode}: {during} V against {healthy} V"
            );
            // Outside the 200 ms, and before the onset, the voltage is nominal.
            assert!(
                (rms_over(&mut pm, 10.4) / healthy - 1.0).abs() < 1e-6,
                "{mode}"
            );
            assert!(
                (rms_over(&mut pm, 2.0) / healthy - 1.0).abs() < 1e-6,
                "{mode}"
            );
        }
    }
}
