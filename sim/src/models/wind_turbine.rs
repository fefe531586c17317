//! A 3 MW wind turbine: Ornstein–Uhlenbeck wind, a power curve with curtailment, rotor
//! speed from the tip-speed ratio, a thermal bearing model, and a vibration channel of the
//! main bearing with shaft harmonics, a structural resonance and broadband noise.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use twinmesh_twins::AssetKind;

use super::{secs, whole_secs};
use crate::model::AssetModel;

const RATED_KW: f64 = 3000.0;
const CUT_IN: f64 = 3.0;
const RATED_WIND: f64 = 12.0;
const CUT_OUT: f64 = 25.0;
const RATED_RPM: f64 = 15.0;
/// High-speed shaft / rotor (gearbox ratio): the vibration sensor sits on the HSS bearing.
const GEAR_RATIO: f64 = 100.0;
const RESONANCE_HZ: f64 = 2_800.0;

pub struct WindTurbine {
    rng: ChaCha8Rng,
    noise: Normal<f64>,
    second: Option<i64>,
    wind: f64,
    power_limit: f64,
    bearing_temp: f64,
    /// Phase of the high-speed shaft, integrated sample by sample.
    shaft_phase: f64,
    last_vib_t: Option<i64>,
}

impl WindTurbine {
    pub fn new(mut rng: ChaCha8Rng) -> Self {
        let wind = rng.random_range(6.0..11.0);
        WindTurbine {
            rng,
            noise: Normal::new(0.0, 1.0).expect("valid normal"),
            second: None,
            wind,
            power_limit: RATED_KW,
            bearing_temp: 35.0,
            shaft_phase: 0.0,
            last_vib_t: None,
        }
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

    fn rotor_rpm(&self) -> f64 {
        if !(CUT_IN..CUT_OUT).contains(&self.wind) {
            return 0.5; // idling
        }
        (RATED_RPM * self.wind / RATED_WIND).min(RATED_RPM)
    }

    fn step_second(&mut self) {
        // Ornstein–Uhlenbeck around 9 m/s with a 60 s time constant.
        let theta = 1.0 / 60.0;
        let sigma = 0.35;
        let dw = theta * (9.0 - self.wind) + sigma * self.noise.sample(&mut self.rng);
        self.wind = (self.wind + dw).clamp(0.0, 35.0);
        let target = 30.0 + 25.0 * self.power() / RATED_KW;
        self.bearing_temp += (target - self.bearing_temp) / 600.0;
    }
}

impl AssetModel for WindTurbine {
    fn kind(&self) -> AssetKind {
        AssetKind::WindTurbine
    }

    fn advance(&mut self, t_ns: i64) {
        let s = whole_secs(t_ns);
        match self.second {
            None => self.second = Some(s),
            Some(prev) => {
                // Catch up at most an hour of dynamics after a pause.
                for _ in 0..(s - prev).clamp(0, 3600) {
                    self.step_second();
                }
                self.second = Some(s.max(prev));
            }
        }
    }

    fn sample(&mut self, signal: &str, t_ns: i64) -> f64 {
        match signal {
            "wind_speed" => self.wind,
            "rotor_speed" => self.rotor_rpm(),
            "power" => self.power(),
            "bearing_temperature" => self.bearing_temp,
            "bearing_vibration" => {
                let shaft_hz = self.rotor_rpm() * GEAR_RATIO / 60.0;
                let dt = self.last_vib_t.map_or(0.0, |p| secs(t_ns - p).max(0.0));
                self.last_vib_t = Some(t_ns);
                self.shaft_phase = (self.shaft_phase + std::f64::consts::TAU * shaft_hz * dt)
                    % std::f64::consts::TAU;
                let load = 0.3 + self.power() / RATED_KW;
                let t = secs(t_ns);
                load * (2.0 * self.shaft_phase.sin() + 0.6 * (2.0 * self.shaft_phase).sin())
                    + 0.3 * (std::f64::consts::TAU * RESONANCE_HZ * t).sin()
                    + 0.4 * self.noise.sample(&mut self.rng)
            }
            _ => f64::NAN,
        }
    }

    fn set(&mut self, property: &str, value: f64) {
        if property == "power_limit" {
            self.power_limit = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

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

    #[test]
    fn wind_stays_plausible_for_a_day() {
        let mut wt = WindTurbine::new(ChaCha8Rng::seed_from_u64(7));
        for h in 0..24 {
            wt.advance(h * 3_600_000_000_000);
            let w = wt.sample("wind_speed", h * 3_600_000_000_000);
            assert!((0.0..=35.0).contains(&w), "{w}");
        }
    }
}
