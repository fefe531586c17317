//! The simulator interface and the kind → model mapping.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use twinmesh_twins::{AssetKind, TwinId};

use crate::models;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum SimError {
    #[error("no simulator for asset kind {0} yet")]
    UnsupportedKind(AssetKind),
    #[error(transparent)]
    Domain(#[from] twinmesh_twins::Error),
}

/// A simulated asset. Time is in nanoseconds since the Unix epoch.
pub trait AssetModel: Send + Sync {
    fn kind(&self) -> AssetKind;
    /// Moves the slow state (wind, load, temperatures, counters) forward to `t_ns`.
    /// Called with non-decreasing times.
    fn advance(&mut self, t_ns: i64);
    /// The value of `signal` at `t_ns` (within the last advanced second).
    fn sample(&mut self, signal: &str, t_ns: i64) -> f64;
    /// Applies a set-point already checked against the kind's schema.
    fn set(&mut self, property: &str, value: f64);
}

/// A seeded RNG for one asset: the same (seed, twin) always gives the same stream.
pub fn rng_for(seed: u64, twin: &TwinId) -> ChaCha8Rng {
    // FNV-1a over the id: stable across Rust versions, unlike `DefaultHasher`.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in twin.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    ChaCha8Rng::seed_from_u64(seed ^ h)
}

/// The simulator of `kind` for asset `twin`.
pub fn new_model(
    kind: AssetKind,
    twin: &TwinId,
    seed: u64,
) -> Result<Box<dyn AssetModel>, SimError> {
    let rng = rng_for(seed, twin);
    match kind {
        AssetKind::WindTurbine => Ok(Box::new(models::wind_turbine::WindTurbine::new(rng))),
        AssetKind::PowerMeter => Ok(Box::new(models::power_meter::PowerMeter::new(rng))),
        AssetKind::TurnstileGate => Ok(Box::new(models::turnstile::TurnstileGate::new(rng))),
        other => Err(SimError::UnsupportedKind(other)),
    }
}

/// Kinds [`new_model`] can simulate.
pub const SIMULATED_KINDS: [AssetKind; 3] = [
    AssetKind::WindTurbine,
    AssetKind::PowerMeter,
    AssetKind::TurnstileGate,
];
