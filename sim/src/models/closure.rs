//! A bottle-closure line: a machine-state Markov chain (running, stopped, fault, setup),
//! production and reject counters while running, and an energy counter. Fault `jam`: the
//! line goes to the fault state and stays there.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use twinmesh_twins::AssetKind;

use super::{Base, PerSecond};

const RUNNING: f64 = 1.0;
const STOPPED: f64 = 0.0;
const FAULT: f64 = 2.0;
const SETUP: f64 = 3.0;

pub struct ClosureLine {
    rng: ChaCha8Rng,
    state: f64,
    speed_pct: f64,
    produced: f64,
    rejected: f64,
    energy: f64,
    base: Base,
}

impl ClosureLine {
    pub fn new(rng: ChaCha8Rng) -> Self {
        ClosureLine {
            rng,
            state: RUNNING,
            speed_pct: 100.0,
            produced: 0.0,
            rejected: 0.0,
            energy: 0.0,
            base: Base::default(),
        }
    }
}

impl PerSecond for ClosureLine {
    const KIND: AssetKind = AssetKind::ClosureLine;

    fn base(&mut self) -> &mut Base {
        &mut self.base
    }

    fn step(&mut self, s: i64) {
        let u: f64 = self.rng.random();
        self.state = if self.base.faults.on("jam", s * 1_000_000_000) {
            FAULT
        } else if self.state == RUNNING {
            match u {
                u if u < 0.002 => STOPPED,
                u if u < 0.003 => FAULT,
                u if u < 0.004 => SETUP,
                _ => RUNNING,
            }
        } else if u < 0.05 {
            RUNNING
        } else {
            self.state
        };
        let (rate, kw) = if self.state == RUNNING {
            (20.0 * self.speed_pct / 100.0, 45.0)
        } else {
            (0.0, 8.0)
        };
        let made = rate.floor() + f64::from(self.rng.random_bool(rate.fract()));
        self.produced += made;
        if made > 0.0
            && self
                .rng
                .random_bool(0.005_f64.min(1.0) * made / made.max(1.0))
        {
            self.rejected += 1.0;
        }
        self.energy += kw / 3600.0;
    }

    fn value(&mut self, signal: &str, _t_ns: i64) -> f64 {
        match signal {
            "production_count" => self.produced,
            "reject_count" => self.rejected,
            "machine_state" => self.state,
            "energy" => self.energy,
            _ => f64::NAN,
        }
    }

    fn set_point(&mut self, property: &str, value: f64) {
        if property == "line_speed" {
            self.speed_pct = value;
        }
    }
}
