//! A venue turnstile: Poisson arrivals and departures per second whose rates follow an
//! event-day pattern (doors open, half-time, the crowd leaving).

use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Poisson};

use twinmesh_twins::AssetKind;

use super::whole_secs;
use crate::model::AssetModel;

pub struct TurnstileGate {
    rng: ChaCha8Rng,
    second: Option<i64>,
    gate_open: bool,
    people_in: f64,
    people_out: f64,
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
            second: None,
            gate_open: true,
            people_in: 0.0,
            people_out: 0.0,
        }
    }

    fn draw(&mut self, rate: f64) -> f64 {
        Poisson::new(rate).map_or(0.0, |p| p.sample(&mut self.rng))
    }
}

impl AssetModel for TurnstileGate {
    fn kind(&self) -> AssetKind {
        AssetKind::TurnstileGate
    }

    fn advance(&mut self, t_ns: i64) {
        let s = whole_secs(t_ns);
        let prev = *self.second.get_or_insert(s);
        if s > prev {
            let hour = (s.rem_euclid(86_400)) as f64 / 3600.0;
            let (a, d) = rates(hour);
            let (a, d) = if self.gate_open { (a, d) } else { (0.0, 0.0) };
            self.people_in = self.draw(a);
            self.people_out = self.draw(d);
            self.second = Some(s);
        }
    }

    fn sample(&mut self, signal: &str, _t_ns: i64) -> f64 {
        match signal {
            "people_in" => self.people_in,
            "people_out" => self.people_out,
            _ => f64::NAN,
        }
    }

    fn set(&mut self, property: &str, value: f64) {
        if property == "gate_open" {
            self.gate_open = value >= 0.5;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_closed_gate_counts_nobody() {
        let mut g = TurnstileGate::new(ChaCha8Rng::seed_from_u64(5));
        g.set("gate_open", 0.0);
        let mut total = 0.0;
        for s in 0..3600 {
            g.advance(s * 1_000_000_000 + 18 * 3_600_000_000_000);
            total += g.sample("people_in", 0);
        }
        assert_eq!(total, 0.0);
        g.set("gate_open", 1.0);
        for s in 3600..7200 {
            g.advance(s * 1_000_000_000 + 18 * 3_600_000_000_000);
            total += g.sample("people_in", 0);
        }
        assert!(total > 1000.0, "{total}");
    }
}
