//! The simulator interface and the kind → model mapping.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

use twinmesh_twins::{AssetKind, TwinId};

use crate::models;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum SimError {
    #[error(
        "unknown fault {fault:?} for {kind}: expected one of {allowed}, drift:SIGNAL, stuck:SIGNAL"
    )]
    UnknownFault {
        kind: AssetKind,
        fault: String,
        allowed: String,
    },
    #[error("invalid fault spec {0:?}: expected ASSET=MODE@SECONDS (e.g. wt-01=outer_race@30)")]
    BadFaultSpec(String),
    #[error(transparent)]
    Domain(#[from] twinmesh_twins::Error),
}

/// A simulated asset. Time is in nanoseconds since the Unix epoch.
pub trait AssetModel: Send + Sync {
    fn kind(&self) -> AssetKind;
    /// Moves the slow state (wind, load, temperatures, counters) forward to `t_ns`.
    /// Called with non-decreasing times.
    fn advance(&mut self, t_ns: i64);
    /// The value of `signal` at `t_ns` (within the last advanced second). Called with
    /// non-decreasing times per signal.
    fn sample(&mut self, signal: &str, t_ns: i64) -> f64;
    /// Applies a set-point already checked against the kind's schema.
    fn set(&mut self, property: &str, value: f64);
    /// Starts asset fault `mode` (one of [`crate::fault::kind_faults`]) at `at_ns`.
    fn inject(&mut self, mode: &str, at_ns: i64);
    /// Identifiers that came (`true`) or went (`false`) since the last call, with the
    /// stream and time: (stream, t_ns, identifier, present).
    fn sightings(&mut self) -> Vec<(&'static str, i64, String, bool)> {
        Vec::new()
    }
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

/// The simulator of `kind` for asset `twin`. Only the built-in kinds have one
/// ([`has_simulator`]); callers check before (a node refuses `--simulate` of another
/// kind at start), so asking for another is a programming error.
pub fn new_model(kind: AssetKind, twin: &TwinId, seed: u64) -> Box<dyn AssetModel> {
    let rng = rng_for(seed, twin);
    match kind {
        AssetKind::WindTurbine => Box::new(models::wind_turbine::WindTurbine::new(rng)),
        AssetKind::Spindle => Box::new(models::spindle::Spindle::new(rng)),
        AssetKind::CrankshaftLine => Box::new(models::crankshaft::CrankshaftLine::new(rng)),
        AssetKind::ClosureLine => Box::new(models::closure::ClosureLine::new(rng)),
        AssetKind::TurnstileGate => Box::new(models::turnstile::TurnstileGate::new(rng)),
        AssetKind::WifiAp => Box::new(models::wifi::WifiAp::new(rng)),
        AssetKind::PowerMeter => Box::new(models::power_meter::PowerMeter::new(rng)),
        AssetKind::HpcNode => Box::new(models::hpc::HpcNode::new(rng)),
        other => panic!("kind {other} has no simulator: only the built-in kinds are simulated"),
    }
}

/// Whether twinmesh can simulate assets of `kind` (the built-in kinds; a kind from a
/// Thing Model has no simulator, its data comes from devices).
pub fn has_simulator(kind: AssetKind) -> bool {
    kind.is_builtin()
}

/// Kinds that can be simulated (the built-in ones).
pub const SIMULATED_KINDS: [AssetKind; 8] = AssetKind::ALL;
