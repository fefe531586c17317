//! A crankshaft machining line: parts move through stations; each cycle clamps (torque
//! ramp), machines under hydraulic pressure, and counts a part. Fault `station_jam`: cycle
//! times grow by half and pressure sags.

use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use twinmesh_twins::AssetKind;

use super::{secs, Base, PerSecond};

pub struct CrankshaftLine {
    rng: ChaCha8Rng,
    noise: Normal<f64>,
    target_cycle: f64,
    cycle_start: f64,
    cycle_len: f64,
    last_cycle: f64,
    parts: f64,
    base: Base,
}

impl CrankshaftLine {
    pub fn new(rng: ChaCha8Rng) -> Self {
        CrankshaftLine {
            rng,
            noise: Normal::new(0.0, 1.0).expect("valid normal"),
            target_cycle: 90.0,
            cycle_start: f64::NAN,
            cycle_len: 90.0,
            last_cycle: 90.0,
            parts: 0.0,
            base: Base::default(),
        }
    }

    fn jam(&self, t: f64) -> bool {
        self.base.faults.on("station_jam", (t * 1e9) as i64)
    }
}

impl PerSecond for CrankshaftLine {
    const KIND: AssetKind = AssetKind::CrankshaftLine;

    fn base(&mut self) -> &mut Base {
        &mut self.base
    }

    fn step(&mut self, s: i64) {
        let t = s as f64;
        if self.cycle_start.is_nan() {
            self.cycle_start = t;
        }
        if t - self.cycle_start >= self.cycle_len {
            self.parts += 1.0;
            self.last_cycle = self.cycle_len;
            self.cycle_start = t;
            let factor = if self.jam(t) { 1.5 } else { 1.0 };
            self.cycle_len =
                (self.target_cycle * factor + 3.0 * self.noise.sample(&mut self.rng)).max(10.0);
        }
    }

    fn value(&mut self, signal: &str, t_ns: i64) -> f64 {
        let t = secs(t_ns);
        let into = if self.cycle_start.is_nan() {
            0.0
        } else {
            (t - self.cycle_start).max(0.0)
        };
        match signal {
            "cycle_time" => self.last_cycle,
            "part_count" => self.parts,
            // Clamping ramps torque in the first 5 s of a cycle, then holds it.
            "torque" => 800.0 * (into / 5.0).min(1.0) + 10.0 * self.noise.sample(&mut self.rng),
            "pressure" => {
                let base = if self.jam(t) { 140.0 } else { 210.0 };
                base + 5.0 * self.noise.sample(&mut self.rng)
            }
            _ => f64::NAN,
        }
    }

    fn set_point(&mut self, property: &str, value: f64) {
        if property == "target_cycle_time" {
            self.target_cycle = value;
        }
    }
}
