//! twinmesh domain: everything a twin *is*, with no async and no I/O.
//!
//! # Layout
//!
//! - [`id`]: [`TwinId`] (`{site}/{asset}`), [`NodeId`], [`Tier`] and their validation.
//! - [`kind`]: asset kinds and their signal and set-point schemas, read from W3C WoT
//!   Thing Models ([`kind::thing_model`]) into a process-wide registry; the eight kinds of
//!   DESIGN §4 are embedded models (`twins/models/*.tm.json`).
//! - [`td`]: W3C WoT Thing Descriptions generated from a kind's schema.
//! - [`state`]: [`TwinCore`], the twin's state and its transitions — frame admission
//!   by sequence number, reported values, desired values with delivery status, revision.
//! - [`stats`]: window statistics (count, min, max, mean, rms) and their mergeable
//!   accumulator, used for derived features; [`stats::HistoryBuckets`], the bucketing
//!   of history queries every store uses.
//! - [`history`]: the checks of history queries and imports (the API's door and the
//!   twin make the same ones).
//! - [`snapshot`]: which twin a snapshot is of and which of two is newer (replicas keep
//!   the newest by epoch, then revision).
//! - [`keys`]: the Zenoh key space of DESIGN §6 as functions.
//! - [`frame`]: validation of telemetry frames (bad input never reaches a twin).
//! - [`model`]: anomaly models over feature vectors (PCA, robust baseline, isolation
//!   forest): training, calibrated thresholds, versioned checksummed files, scoring.
//! - [`monitor`]: a twin's scoring of its feature windows — health status with
//!   debounced alarms and their contributing features, drift of the score distribution.
//! - [`window`]: the edge-analysis front end — the process-signal points kept as the
//!   context of analysis windows and how a window's context is filled (the twin and
//!   `twinmesh eval` both use it).
//! - [`privacy`]: privacy policies, the ε budget ledger, OpenDP releases,
//!   micro-aggregation, pseudonymisation and the egress gate.
//! - [`dsp`]: signal operators (Butterworth SOS, sosfilt, decimation, FFT, Welch PSD,
//!   Hilbert envelope, THD) and the lossless frame codec.
//! - [`chain`]: processing chains — specs, validation against a kind, default chains,
//!   streaming IoT pipelines and windowed edge analysis.
//! - [`bearing`]: rolling-bearing kinematics (BPFO, BPFI, BSF, FTF).
//! - [`onnx`]: ONNX anomaly models run through tract.
//! - [`error`]: [`Error`] and [`ErrorCode`], the workspace's one classification of
//!   errors (DESIGN §9).
//!
//! Time always comes in as data (`now_ns` arguments); nothing here reads a clock.

pub mod bearing;
pub mod chain;
pub mod dsp;
pub mod error;
pub mod frame;
pub mod history;
pub mod id;
pub mod keys;
pub mod kind;
pub mod model;
pub mod monitor;
pub mod onnx;
pub mod privacy;
pub mod snapshot;
pub mod state;
pub mod stats;
pub mod td;
pub mod window;

pub use error::{Error, ErrorCode, Result};
pub use id::{NodeId, Tier, TwinId};
pub use kind::AssetKind;
pub use state::TwinCore;
pub use twinmesh_proto::v1 as proto;
