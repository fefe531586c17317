//! twinmesh simulation: seeded, physically plausible asset simulators with fault
//! injection, and devices that feed them to an IoT gateway in real time.
//!
//! # Layout
//!
//! - [`model`]: the [`model::AssetModel`] trait (slow state advanced in time, samples
//!   computed at any instant) and [`model::new_model`] for each kind.
//! - [`models`]: one module per asset kind (wind turbine with a rolling-bearing model,
//!   power meter with harmonics, turnstile gate with a daily pattern).
//! - [`device`]: [`device::SimDevice`], an [`twinmesh_actors::ports::Device`] that samples
//!   a model at each signal's rate between polls.
//! - [`fault`]: fault modes and their onset, per kind.
//! - [`features`]: feature windows of simulated runs, for `twinmesh eval`.
//! - [`mesh`]: a whole mesh in one process on virtual time — the in-memory fabric
//!   (Zenoh's own key-expression matching, partitions, drops, delays) and store (crash
//!   semantics), and the cluster that runs the real actors on them.
//!
//! Everything is deterministic for a given seed: the same seed, asset and times give the
//! same samples.

pub mod device;
pub mod fault;
pub mod features;
pub mod mesh;
pub mod model;
pub mod models;

pub use device::{generate, QuietDevice, SimDevice};
pub use fault::{Fault, FaultMode};
pub use model::{new_model, AssetModel, SimError};
