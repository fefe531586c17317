//! A 3 MW wind turbine: Ornstein–Uhlenbeck wind, a power curve with curtailment, rotor
//! speed from the tip-speed ratio, a thermal bearing model, and the vibration of the
//! high-speed-shaft bearing: shaft harmonics, a structural resonance, broadband noise and,
//! under a bearing fault, the impulse train of the defect (outer race at BPFO, inner race
//! at BPFI modulated by the shaft, ball at 2×BSF), each impulse ringing the resonance.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use twinmesh_twins::bearing::{
    DefectFrequencies, WIND_TURBINE_GEAR_RATIO, WIND_TURBINE_HSS_BEARING,
};
use twinmesh_twins::AssetKind;

use super::{secs, Base, PerSecond};

const RATED_KW: f64 = 3000.0;
const CUT_IN: f64 = 3.0;
const RATED_WIND: f64 = 12.0;
const CUT_OUT: f64 = 25.0;
const RATED_RPM: f64 = 15.0;
/// Time constant of the rotor speed following the wind (inertia), s.
const ROTOR_TIME_CONSTANT_S: f64 = 20.0;
/// Structural resonance excited by bearing impacts.
pub const RESONANCE_HZ: f64 = 3_500.0;
const RESONANCE_DAMPING: f64 = 0.05;
/// Peak acceleration of one defect impact (m/s²).
const IMPACT_AMPLITUDE: f64 = 8.0;
/// An always-present tone near the resonance (mesh of an auxiliary gear).
const TONE_HZ: f64 = 2_800.0;

/// One bearing defect mode.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Defect {
    OuterRace,
    InnerRace,
    Ball,
}

impl Defect {
    fn frequency(self, d: &DefectFrequencies) -> f64 {
        match self {
            Defect::OuterRace => d.bpfo,
            Defect::InnerRace => d.bpfi,
            // A ball defect hits both races once per spin.
            Defect::Ball => 2.0 * d.bsf,
        }
    }
}

struct DefectState {
    defect: Defect,
    at_ns: i64,
    /// Cycles of the defect frequency since the last impact.
    phase: f64,
    /// Time and amplitude of the last impact.
    last: Option<(f64, f64)>,
}

pub struct WindTurbine {
    rng: ChaCha8Rng,
    noise: Normal<f64>,
    wind: f64,
    rotor_rpm: f64,
    power_limit: f64,
    bearing_temp: f64,
    /// Phase of the high-speed shaft, integrated sample by sample.
    shaft_phase: f64,
    last_vib_t: Option<i64>,
    defects: Vec<DefectState>,
    base: Base,
}

impl WindTurbine {
    pub fn new(mut rng: ChaCha8Rng) -> Self {
        let wind = rng.random_range(6.0..11.0);
        let mut wt = WindTurbine {
            rng,
            noise: Normal::new(0.0, 1.0).expect("valid normal"),
            wind,
            rotor_rpm: 0.0,
            power_limit: RATED_KW,
            bearing_temp: 35.0,
            shaft_phase: 0.0,
            last_vib_t: None,
            defects: Vec::new(),
            base: Base::default(),
        };
        wt.rotor_rpm = wt.target_rpm();
        wt
    }

    fn power(&self) -> f64 {
        let w = self.wind;
        let p = if !(CUT_IN..CUT_OUT).contains(&w) {
            0.0
        } else if w >= RATED_WIND {
            RATED_KW
        } else {
            RATED_KW * ((w - CUT_IN) / (RATED_WIND - CUT_IN)).powi(3)
        };
        p.min(self.power_limit)
    }

    /// Rotor speed the wind asks for.
    fn target_rpm(&self) -> f64 {
        if !(CUT_IN..CUT_OUT).contains(&self.wind) {
            return 0.5; // idling
        }
        (RATED_RPM * self.wind / RATED_WIND).min(RATED_RPM)
    }

    fn rotor_rpm(&self) -> f64 {
        self.rotor_rpm
    }

    /// Shaft frequency of the high-speed shaft, Hz.
    pub fn shaft_hz(&self) -> f64 {
        self.rotor_rpm() * WIND_TURBINE_GEAR_RATIO / 60.0
    }

    fn vibration(&mut self, t_ns: i64) -> f64 {
        let shaft_hz = self.shaft_hz();
        let dt = self.last_vib_t.map_or(0.0, |p| secs(t_ns - p).max(0.0));
        self.last_vib_t = Some(t_ns);
        self.shaft_phase =
            (self.shaft_phase + std::f64::consts::TAU * shaft_hz * dt) % std::f64::consts::TAU;
        let load = 0.3 + self.power() / RATED_KW;
        let t = secs(t_ns);
        let mut v = load * (2.0 * self.shaft_phase.sin() + 0.6 * (2.0 * self.shaft_phase).sin())
            + 0.3 * (std::f64::consts::TAU * TONE_HZ * t).sin()
            + 0.4 * self.noise.sample(&mut self.rng);
        let freqs = WIND_TURBINE_HSS_BEARING.defect_frequencies(shaft_hz);
        let wn = std::f64::consts::TAU * RESONANCE_HZ;
        let wd = wn * (1.0 - RESONANCE_DAMPING * RESONANCE_DAMPING).sqrt();
        for d in &mut self.defects {
            if t_ns < d.at_ns {
                continue;
            }
            let f = d.defect.frequency(&freqs);
            d.phase += f * dt;
            if d.phase >= 1.0 {
                d.phase -= d.phase.floor();
                // The impact happened when the phase crossed 1, within this step.
                let since = if f > 0.0 { d.phase / f } else { 0.0 };
                let jitter = 1.0 + 0.1 * self.noise.sample(&mut self.rng);
                let modulation = match d.defect {
                    // The inner race turns with the shaft through the load zone.
                    Defect::InnerRace => 0.6 + 0.4 * self.shaft_phase.cos(),
                    _ => 1.0,
                };
                d.last = Some((
                    t - since,
                    IMPACT_AMPLITUDE * load.min(1.0) * jitter * modulation,
                ));
            }
            if let Some((t0, amp)) = d.last {
                let tau = t - t0;
                if (0.0..0.02).contains(&tau) {
                    v += amp * (-RESONANCE_DAMPING * wn * tau).exp() * (wd * tau).sin();
                }
            }
        }
        v
    }
}

impl PerSecond for WindTurbine {
    const KIND: AssetKind = AssetKind::WindTurbine;

    fn base(&mut self) -> &mut Base {
        &mut self.base
    }

    fn step(&mut self, second: i64) {
        // Ornstein–Uhlenbeck around 9 m/s with a 60 s time constant.
        let dw = (9.0 - self.wind) / 60.0 + 0.35 * self.noise.sample(&mut self.rng);
        self.wind = (self.wind + dw).clamp(0.0, 35.0);
        // The rotor's inertia follows the wind with a 20 s time constant.
        self.rotor_rpm += (self.target_rpm() - self.rotor_rpm) / ROTOR_TIME_CONSTANT_S;
        // A damaged bearing runs hotter.
        let damage = if self.base.faults.on("outer_race", second * 1_000_000_000)
            || self.base.faults.on("inner_race", second * 1_000_000_000)
            || self.base.faults.on("ball", second * 1_000_000_000)
        {
            12.0
        } else {
            0.0
        };
        let target = 30.0 + 25.0 * self.power() / RATED_KW + damage;
        self.bearing_temp += (target - self.bearing_temp) / 600.0;
    }

    fn value(&mut self, signal: &str, t_ns: i64) -> f64 {
        match signal {
            "wind_speed" => self.wind,
            "rotor_speed" => self.rotor_rpm(),
            "power" => self.power(),
            "bearing_temperature" => self.bearing_temp,
            "bearing_vibration" => self.vibration(t_ns),
            _ => f64::NAN,
        }
    }

    fn set_point(&mut self, property: &str, value: f64) {
        if property == "power_limit" {
            self.power_limit = value;
        }
    }

    fn fault_started(&mut self, mode: &str, at_ns: i64) {
        let defect = match mode {
            "outer_race" => Defect::OuterRace,
            "inner_race" => Defect::InnerRace,
            "ball" => Defect::Ball,
            _ => return,
        };
        self.defects.push(DefectState {
            defect,
            at_ns,
            phase: 0.0,
            last: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AssetModel;
    use rand::SeedableRng;
    use twinmesh_twins::dsp::{self, BandType, Spectral};

    #[test]
    fn power_follows_the_curve_and_the_limit() {
        let mut wt = WindTurbine::new(ChaCha8Rng::seed_from_u64(1));
        wt.wind = 15.0;
        assert_eq!(wt.power(), RATED_KW);
        wt.set("power_limit", 1200.0);
        assert_eq!(wt.power(), 1200.0);
        wt.wind = 2.0;
        assert_eq!(wt.power(), 0.0);
        wt.wind = 7.5;
        wt.set("power_limit", RATED_KW);
        assert!((wt.power() - RATED_KW * 0.125).abs() < 1e-9);
    }

    /// One second of vibration, band-passed around the resonance: the envelope spectrum
    /// peaks at BPFO only once the outer-race fault has started.
    #[test]
    fn outer_race_fault_shows_at_bpfo_in_the_envelope_spectrum() {
        let fs = 10_000.0;
        let t0: i64 = 1_700_000_000_000_000_000;
        let mut wt = WindTurbine::new(ChaCha8Rng::seed_from_u64(3));
        wt.wind = 13.0;
        wt.rotor_rpm = wt.target_rpm();
        wt.inject("outer_race", t0 + 1_000_000_000);
        let mut sp = Spectral::new();
        let sos = dsp::butter(4, &[2000.0, 4900.0], BandType::Bandpass, fs).unwrap();
        let bpfo = WIND_TURBINE_HSS_BEARING
            .defect_frequencies(wt.shaft_hz())
            .bpfo;
        for (second, faulty) in [(0, false), (1, true), (2, true)] {
            let x: Vec<f64> = (0..10_000)
                .map(|i| {
                    wt.sample(
                        "bearing_vibration",
                        t0 + second * 1_000_000_000 + i * 100_000,
                    )
                })
                .collect();
            let es = sp.envelope_spectrum(&dsp::sosfilt(&sos, &x)).unwrap();
            let peak = dsp::peaks(&es, 1.0, 1)[0];
            if faulty {
                assert!(
                    (peak.frequency_hz - bpfo).abs() <= 1.0,
                    "peak {peak:?}, bpfo {bpfo}"
                );
            } else {
                assert!(
                    (peak.frequency_hz - bpfo).abs() > 1.0 || peak.magnitude < 0.05,
                    "{peak:?}"
                );
            }
        }
    }
}
