//! A bottle-closure line: a machine-state Markov chain (running, stopped, fault, setup),
//! production and reject counters while running, and an energy counter. Fault `jam`: the
//! line goes to the fault state and stays there.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use twinmesh_twins::AssetKind;

use super::{each_second, Faults};
use crate::model::AssetModel;

const RUNNING: f64 = 1.0;
const STOPPED: f64 = 0.0;
const FAULT: f64 = 2.0;
const SETUP: f64 = 3.0;

pub struct ClosureLine {
    rng: ChaCha8Rng,
    second: Option<i64>,
    state: f64,
    speed_pct: f64,
    produced: f64,
    rejected: f64,
    energy: f64,
    faults: Faults,
}

impl ClosureLine {
    pub fn new(rng: ChaCha8Rng) -> Self {
        ClosureLine {
            rng,
            second: None,
            state: RUNNING,
            speed_pct: 100.0,
            produced: 0.0,
            rejected: 0.0,
            energy: 0.0,
            faults: Faults::default(),
        }
    }

    fn step(&mut self, s: i64) {
        let u: f64 = self.rng.random();
        self.state = if self.faults.on("jam", s * 1_000_000_000) {
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
}

impl AssetModel for ClosureLine {
    fn kind(&self) -> AssetKind {
        AssetKind::ClosureLine
    }

    fn advance(&mut self, t_ns: i64) {
        let mut second = self.second;
        each_second(&mut second, t_ns, |s| self.step(s));
        self.second = second;
    }

    fn sample(&mut self, signal: &str, _t_ns: i64) -> f64 {
        match signal {
            "production_count" => self.produced,
            "reject_count" => self.rejected,
            "machine_state" => self.state,
            "energy" => self.energy,
            _ => f64::NAN,
        }
    }

    fn set(&mut self, property: &str, value: f64) {
        if property == "line_speed" {
            self.speed_pct = value;
        }
    }

    fn inject(&mut self, mode: &str, at_ns: i64) {
        self.faults.add(mode, at_ns);
    }
}
