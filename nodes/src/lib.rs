//! twinmesh nodes: the adapters that make the actors real, and the `twinmesh` binary.
//!
//! # Layout
//!
//! - [`config`]: [`config::NodeConfig`] (TOML or flags), validated up front.
//! - [`fabric`]: [`fabric::ZenohFabric`], the `Fabric` port on a Zenoh 1.x session.
//! - [`store`]: [`store::SledStore`], the `Store` port on one sled database per node.
//! - [`runtime`]: [`runtime::RunningNode`] starts/stops one node; [`run`] is what the
//!   binary calls.
//! - [`api`]: location-transparent operations (twin RPC over the fabric, listings).
//! - [`acl`]: Zenoh access control generated from a roster of certificate names.
//! - [`auth`]: bearer JWTs and the least role of each RPC.
//! - [`grpc`]: `TwinService` and `MeshService` (tonic), health, reflection.
//! - [`models`]: the cloud's model registry, training on archived features,
//!   deployment to twins, `ModelService`.
//! - [`privacy`]: `PrivacyService` (policies, budgets, DP releases).
//! - [`certs`]: `twinmesh certs` (site CA, node certificates).
//! - [`keys`]: `twinmesh keys` (site key files).
//! - [`http`]: dashboard, JSON views and `/metrics` (axum).
//! - [`up`]: the whole mesh in one process (`twinmesh up`).
//! - [`ctl`]: the `twinmesh ctl` client.
//! - [`bench`]: `twinmesh bench`.
//! - [`eval`]: `twinmesh eval`, detection delays and false alarms of the anomaly models.
//! - [`tools`]: `twinmesh sim`, `twinmesh dsp`, `twinmesh ingest`.
//! - [`cli`]: argument parsing for the binary.

pub mod acl;
pub mod api;
pub mod auth;
pub mod bench;
pub mod bench_models;
pub mod bench_privacy;
pub mod certs;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod eval;
pub mod fabric;
pub mod grpc;
pub mod http;
pub mod keys;
pub mod models;
pub mod privacy;
pub mod runtime;
pub mod store;
pub mod tools;
pub mod up;

pub use runtime::{run, RunningNode};
