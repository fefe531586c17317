//! An HPC compute node: jobs arrive and finish (load = busy cores), power follows load
//! under a power cap, a first-order thermal model with a fan controller keeps the CPU
//! cool. Fault `overheating`: the fan loses 80 % of its airflow.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use twinmesh_twins::AssetKind;

use super::{Base, PerSecond};

const IDLE_W: f64 = 250.0;
const MAX_W: f64 = 1400.0;
const AMBIENT: f64 = 22.0;

pub struct HpcNode {
    rng: ChaCha8Rng,
    noise: Normal<f64>,
    load: f64,
    power: f64,
    temp: f64,
    fan_rpm: f64,
    power_cap: f64,
    fan_min: f64,
    base: Base,
}

impl HpcNode {
    pub fn new(rng: ChaCha8Rng) -> Self {
        HpcNode {
            rng,
            noise: Normal::new(0.0, 1.0).expect("valid normal"),
            load: 0.2,
            power: IDLE_W,
            temp: 40.0,
            fan_rpm: 6000.0,
            power_cap: 1500.0,
            fan_min: 30.0,
            base: Base::default(),
        }
    }
}

impl PerSecond for HpcNode {
    const KIND: AssetKind = AssetKind::HpcNode;

    fn base(&mut self) -> &mut Base {
        &mut self.base
    }

    fn step(&mut self, s: i64) {
        // Jobs: load jumps when one starts or ends, otherwise drifts.
        if self.rng.random_bool(0.01) {
            self.load = self.rng.random_range(0.1..1.0);
        }
        self.load = (self.load + 0.005 * self.noise.sample(&mut self.rng)).clamp(0.0, 1.0);
        self.power = (IDLE_W + self.load * (MAX_W - IDLE_W)).min(self.power_cap);
        // Fan: proportional to temperature above 50 °C, at least `fan_min` %.
        let duty = ((self.temp - 50.0) / 40.0 * 100.0).clamp(self.fan_min, 100.0);
        self.fan_rpm = 160.0 * duty;
        let airflow = if self.base.faults.on("overheating", s * 1_000_000_000) {
            0.2
        } else {
            1.0
        };
        // Thermal resistance CPU → air, °C/W: lower with more airflow.
        let resistance = 0.02 + 0.06 * (1.0 - airflow * duty / 100.0);
        let target = AMBIENT + self.power * resistance;
        self.temp += (target - self.temp) / 30.0;
    }

    fn value(&mut self, signal: &str, _t_ns: i64) -> f64 {
        match signal {
            "cpu_temperature" => self.temp.min(110.0),
            "power" => self.power,
            "fan_speed" => self.fan_rpm,
            "job_load" => self.load,
            _ => f64::NAN,
        }
    }

    fn set_point(&mut self, property: &str, value: f64) {
        match property {
            "power_cap" => self.power_cap = value,
            "fan_min" => self.fan_min = value,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AssetModel;
    use rand::SeedableRng;

    #[test]
    fn fan_failure_overheats() {
        let mut n = HpcNode::new(ChaCha8Rng::seed_from_u64(4));
        for s in 0..1800 {
            n.advance(s * 1_000_000_000);
        }
        let healthy = n.sample("cpu_temperature", 0);
        assert!(healthy < 85.0, "{healthy}");
        n.inject("overheating", 1800 * 1_000_000_000);
        for s in 1800..3600 {
            n.advance(s * 1_000_000_000);
        }
        let hot = n.sample("cpu_temperature", 0);
        assert!(hot > healthy + 10.0, "{healthy} -> {hot}");
    }
}
