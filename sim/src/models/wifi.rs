//! A venue Wi-Fi access point: devices associate and leave (Poisson, daily pattern), each
//! with a synthetic MAC address (the identifiers privacy policies pseudonymise);
//! throughput grows with the associated devices. Fault `outage`: every device drops.

use std::collections::{BTreeSet, VecDeque};

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Poisson};

use twinmesh_twins::AssetKind;

use super::{hour_of, Base, PerSecond};

pub struct WifiAp {
    rng: ChaCha8Rng,
    devices: BTreeSet<u64>,
    tx_power: f64,
    throughput: f64,
    base: Base,
    /// Associations and departures not yet reported (bounded).
    sightings: VecDeque<(&'static str, i64, String, bool)>,
}

/// Most unreported sightings kept (a gateway that stops polling loses the oldest).
const MAX_SIGHTINGS: usize = 10_000;
const STREAM: &str = "device_associations";

/// A synthetic, locally administered MAC address.
pub fn mac(id: u64) -> String {
    let b = id.to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[3], b[4], b[5], b[6], b[7]
    )
}

impl WifiAp {
    pub fn new(rng: ChaCha8Rng) -> Self {
        WifiAp {
            rng,
            devices: BTreeSet::new(),
            tx_power: 20.0,
            throughput: 0.0,
            base: Base::default(),
            sightings: VecDeque::new(),
        }
    }

    /// The (synthetic) MAC addresses associated right now.
    pub fn associated(&self) -> Vec<String> {
        self.devices.iter().map(|&d| mac(d)).collect()
    }

    fn sighted(&mut self, t_ns: i64, id: u64, present: bool) {
        if self.sightings.len() >= MAX_SIGHTINGS {
            self.sightings.pop_front();
        }
        self.sightings.push_back((STREAM, t_ns, mac(id), present));
    }
}

impl PerSecond for WifiAp {
    const KIND: AssetKind = AssetKind::WifiAp;

    fn base(&mut self) -> &mut Base {
        &mut self.base
    }

    fn step(&mut self, s: i64) {
        let t_ns = s * 1_000_000_000;
        if self.base.faults.on("outage", t_ns) {
            for id in std::mem::take(&mut self.devices) {
                self.sighted(t_ns, id, false);
            }
            self.throughput = 0.0;
            return;
        }
        let hour = hour_of(s);
        let busy = 0.2 + (-((hour - 19.0) / 2.5).powi(2)).exp() * 3.0 * self.tx_power / 20.0;
        let arrivals = Poisson::new(busy).map_or(0.0, |p| p.sample(&mut self.rng)) as usize;
        for _ in 0..arrivals {
            let id: u64 = self.rng.random::<u64>() & 0xff_ffff_ffff;
            if self.devices.insert(id) {
                self.sighted(t_ns, id, true);
            }
        }
        // Each device leaves with a mean stay of 20 minutes.
        let rng = &mut self.rng;
        let mut left = Vec::new();
        self.devices.retain(|&d| {
            let stays = !rng.random_bool(1.0 / 1200.0);
            if !stays {
                left.push(d);
            }
            stays
        });
        while self.devices.len() > 2000 {
            let first = *self.devices.iter().next().expect("non-empty");
            self.devices.remove(&first);
            left.push(first);
        }
        for d in left {
            self.sighted(t_ns, d, false);
        }
        self.throughput = self.devices.len() as f64 * (0.5 + self.rng.random::<f64>());
    }

    fn value(&mut self, signal: &str, _t_ns: i64) -> f64 {
        match signal {
            "associated_devices" => self.devices.len() as f64,
            "throughput" => self.throughput,
            _ => f64::NAN,
        }
    }

    fn set_point(&mut self, property: &str, value: f64) {
        if property == "tx_power" {
            self.tx_power = value;
        }
    }

    fn take_sightings(&mut self) -> Vec<(&'static str, i64, String, bool)> {
        std::mem::take(&mut self.sightings).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AssetModel;
    use rand::SeedableRng;

    #[test]
    fn devices_come_and_go_and_an_outage_drops_them() {
        let mut ap = WifiAp::new(ChaCha8Rng::seed_from_u64(2));
        let evening = 19 * 3600;
        for s in evening..evening + 1800 {
            ap.advance(s * 1_000_000_000);
        }
        let n = ap.sample("associated_devices", 0);
        assert!(n > 100.0, "{n}");
        assert_eq!(ap.associated().len() as f64, n);
        assert!(ap.associated()[0].starts_with("02:"));
        // Every present device was reported as it came (and not yet as gone).
        let seen = ap.sightings();
        let mut present = std::collections::BTreeSet::new();
        for (stream, _, mac, here) in &seen {
            assert_eq!(*stream, "device_associations");
            if *here {
                assert!(present.insert(mac.clone()), "{mac} came twice");
            } else {
                assert!(present.remove(mac), "{mac} left without coming");
            }
        }
        assert_eq!(present.into_iter().collect::<Vec<_>>(), ap.associated());
        assert!(ap.sightings().is_empty());
        ap.inject("outage", (evening + 1800) * 1_000_000_000);
        ap.advance((evening + 1801) * 1_000_000_000);
        assert_eq!(ap.sample("associated_devices", 0), 0.0);
        let gone = ap.sightings();
        assert_eq!(gone.len() as f64, n);
        assert!(gone.iter().all(|s| !s.3));
    }
}
