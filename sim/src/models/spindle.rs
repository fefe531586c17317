//! A milling spindle: a speed programme (steps every 30 s), spindle load from the cut,
//! tool wear that grows with cutting time and is reset by a tool change every
//! [`TOOL_LIFE_S`] of cutting (time-based tool life, as a CNC's tool management counts
//! it), a first-order thermal model, and vibration at the tooth-passing frequency whose
//! amplitude grows with wear. Faults: `tool_wear` (wear accelerates 50×: the tool is
//! worn out long before its counted life ends) and `imbalance` (a strong 1× shaft
//! component).

use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use twinmesh_twins::AssetKind;

use super::{secs, Base, PerSecond};

const PROGRAMME_RPM: [f64; 4] = [6_000.0, 12_000.0, 18_000.0, 9_000.0];
const TEETH: f64 = 4.0;
/// Seconds of cutting after which the tool is changed (its wear back to 0): about 0.24
/// of wear on the speed programme.
pub const TOOL_LIFE_S: i64 = 3 * 3600;

pub struct Spindle {
    rng: ChaCha8Rng,
    noise: Normal<f64>,
    speed: f64,
    load: f64,
    wear: f64,
    /// Seconds the current tool has cut.
    tool_s: i64,
    temperature: f64,
    override_pct: f64,
    phase: f64,
    last_t: Option<i64>,
    base: Base,
}

impl Spindle {
    pub fn new(rng: ChaCha8Rng) -> Self {
        Spindle {
            rng,
            noise: Normal::new(0.0, 1.0).expect("valid normal"),
            speed: PROGRAMME_RPM[0],
            load: 30.0,
            wear: 0.0,
            tool_s: 0,
            temperature: 25.0,
            override_pct: 100.0,
            phase: 0.0,
            last_t: None,
            base: Base::default(),
        }
    }
}

impl PerSecond for Spindle {
    const KIND: AssetKind = AssetKind::Spindle;

    fn base(&mut self) -> &mut Base {
        &mut self.base
    }

    fn step(&mut self, s: i64) {
        let t_ns = s * 1_000_000_000;
        self.speed = PROGRAMME_RPM[(s.rem_euclid(120) / 30) as usize] * self.override_pct / 100.0;
        let rate = if self.base.faults.on("tool_wear", t_ns) {
            50.0
        } else {
            1.0
        };
        self.tool_s += 1;
        if self.tool_s >= TOOL_LIFE_S {
            self.tool_s = 0;
            self.wear = 0.0;
        }
        self.wear = (self.wear + rate * 2e-5 * self.speed / 10_000.0).min(1.0);
        self.load = (20.0
            + 30.0 * self.speed / 18_000.0
            + 40.0 * self.wear
            + 2.0 * self.noise.sample(&mut self.rng))
        .clamp(0.0, 150.0);
        let target = 25.0 + 0.45 * self.load;
        self.temperature += (target - self.temperature) / 120.0;
    }

    fn value(&mut self, signal: &str, t_ns: i64) -> f64 {
        match signal {
            "spindle_speed" => self.speed,
            "spindle_load" => self.load,
            "temperature" => self.temperature,
            "vibration" => {
                let dt = self.last_t.map_or(0.0, |p| secs(t_ns - p).max(0.0));
                self.last_t = Some(t_ns);
                let shaft_hz = self.speed / 60.0;
                self.phase =
                    (self.phase + std::f64::consts::TAU * shaft_hz * dt) % std::f64::consts::TAU;
                let tooth = (1.0 + 8.0 * self.wear) * (TEETH * self.phase).sin();
                let imbalance = if self.base.faults.on("imbalance", t_ns) {
                    6.0 * self.phase.sin()
                } else {
                    0.3 * self.phase.sin()
                };
                tooth + imbalance + 0.5 * self.noise.sample(&mut self.rng)
            }
            _ => f64::NAN,
        }
    }

    fn set_point(&mut self, property: &str, value: f64) {
        if property == "speed_override" {
            self.override_pct = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AssetModel;
    use rand::SeedableRng;

    fn wear_after(s: &mut Spindle, from_s: i64, seconds: i64) -> f64 {
        for t in from_s..from_s + seconds {
            s.advance(t * 1_000_000_000);
        }
        s.wear
    }

    #[test]
    fn tools_are_changed_at_their_counted_life_and_the_fault_wears_them_out_first() {
        let mut s = Spindle::new(ChaCha8Rng::seed_from_u64(3));
        let worn = wear_after(&mut s, 0, TOOL_LIFE_S - 1);
        assert!(
            (0.2..0.3).contains(&worn),
            "wear at the end of a tool's life {worn}"
        );
        // The change: a fresh tool.
        let fresh = wear_after(&mut s, TOOL_LIFE_S - 1, 2);
        assert!(fresh < 1e-4, "wear after the change {fresh}");
        // Accelerated wear passes a whole life's wear within 300 s.
        s.inject("tool_wear", (TOOL_LIFE_S + 1) * 1_000_000_000);
        let faulty = wear_after(&mut s, TOOL_LIFE_S + 1, 300);
        assert!(faulty > worn, "accelerated wear {faulty} after 300 s");
    }
}
