//! A venue turnstile: Poisson arrivals and departures per second whose rates follow an
//! event-day pattern (doors open, the crowd leaving). Fault `blocked`: nobody passes.

use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Poisson};

use twinmesh_twins::AssetKind;

use super::{hour_of, Base, PerSecond};

pub struct TurnstileGate {
    rng: ChaCha8Rng,
    gate_open: bool,
    people_in: f64,
    people_out: f64,
    base: Base,
}

/// (arrivals, departures) per second by hour of the day, UTC.
fn rates(hour: f64) -> (f64, f64) {
    let doors = (-((hour - 18.0) / 1.0).powi(2)).exp();
    let leave = (-((hour - 22.0) / 0.5).powi(2)).exp();
    (0.05 + 2.5 * doors, 0.05 + 4.0 * leave)
}

impl TurnstileGate {
    pub fn new(rng: ChaCha8Rng) -> Self {
        TurnstileGate {
            rng,
            gate_open: true,
            people_in: 0.0,
            people_out: 0.0,
            base: Base::default(),
        }
    }
}

fn draw(rng: &mut ChaCha8Rng, rate: f64) -> f64 {
    Poisson::new(rate).map_or(0.0, |p| p.sample(rng))
}

impl PerSecond for TurnstileGate {
    const KIND: AssetKind = AssetKind::TurnstileGate;

    fn base(&mut self) -> &mut Base {
        &mut self.base
    }

    fn step(&mut self, s: i64) {
        let (a, d) = rates(hour_of(s));
        let passing = self.gate_open && !self.base.faults.on("blocked", s * 1_000_000_000);
        let (a, d) = if passing { (a, d) } else { (0.0, 0.0) };
        self.people_in = draw(&mut self.rng, a);
        self.people_out = draw(&mut self.rng, d);
    }

    fn value(&mut self, signal: &str, _t_ns: i64) -> f64 {
        match signal {
            "people_in" => self.people_in,
            "people_out" => self.people_out,
            _ => f64::NAN,
        }
    }

    fn set_point(&mut self, property: &str, value: f64) {
        if property == "gate_open" {
            self.gate_open = value >= 0.5;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AssetModel;
    use rand::SeedableRng;

    fn total_in(g: &mut TurnstileGate, from_s: i64, seconds: i64) -> f64 {
        let mut total = 0.0;
        for s in from_s..from_s + seconds {
            g.advance(s * 1_000_000_000);
            total += g.sample("people_in", 0);
        }
        total
    }

    #[test]
    fn a_closed_or_blocked_gate_counts_nobody() {
        let evening = 18 * 3600;
        let mut g = TurnstileGate::new(ChaCha8Rng::seed_from_u64(5));
        g.set("gate_open", 0.0);
        assert_eq!(total_in(&mut g, evening, 3600), 0.0);
        g.set("gate_open", 1.0);
        assert!(total_in(&mut g, evening + 3600, 3600) > 1000.0);
        g.inject("blocked", (evening + 7200) * 1_000_000_000);
        assert_eq!(total_in(&mut g, evening + 7201, 600), 0.0);
    }
}
