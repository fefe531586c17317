//! twinmesh nodes: the node daemon, the adapters that make the actors real. The
//! `twinmesh` binary and its command-line tools live next door, in `nodes/cli`
//! (crate `twinmesh-cli`), so a reader of the daemon never wades through them.
//!
//! # Layout
//!
//! - [`config`]: [`config::NodeConfig`] (TOML or flags), validated up front.
//! - [`runtime`]: [`runtime::RunningNode`] starts/stops one node; [`run`] is what the
//!   binary calls.
//! - [`fabric`]: [`fabric::ZenohFabric`], the `Fabric` port on a Zenoh 1.x session.
//! - [`router`]: `twinmesh router`, a Zenoh router process for meshes whose nodes
//!   reach each other only through routers.
//! - [`store`]: [`store::SledStore`], the `Store` port on one sled database per node.
//! - [`api`]: location-transparent operations (twin RPC over the fabric, listings).
//! - [`grpc`]: the gRPC services (tonic), one file each, health, reflection.
//! - [`devices`]: device adapters of IoT gateways (MQTT, Modbus TCP, OPC UA).
//! - [`models`]: the cloud's model registry, training on archived features,
//!   deployment to twins, `ModelService`.
//! - [`auth`]: bearer JWTs and the least role of each RPC.
//! - [`acl`]: Zenoh access control generated from a roster of certificate names.
//! - [`http`]: dashboard, JSON views and `/metrics` (axum).
//! - [`certs`]: a site CA and node certificates (files for TLS).
//! - [`keys`]: AES-256 key files (site keys, at-rest keys).
//! - [`kinds`]: asset kinds from Thing Model files (`--models DIR`).
//! - [`client`]: gRPC channels for clients (`ctl`, benchmarks, tests).
//! - [`error`]: [`Error`], with the only conversions to a gRPC status and to HTTP.

pub mod acl;
pub mod api;
pub mod auth;
pub mod certs;
pub mod client;
pub mod config;
pub mod devices;
pub mod error;
pub mod fabric;
pub mod grpc;
pub mod http;
pub mod keys;
pub mod kinds;
pub mod models;
pub mod router;
pub mod runtime;
pub mod store;
pub mod telemetry;

pub use error::{Error, Result};
pub use router::run_router;
pub use runtime::{run, RunningNode};
