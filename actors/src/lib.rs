//! twinmesh actors: the twin, node and mesh supervisors and the IoT gateway, written
//! against two ports so they run the same over Zenoh + sled (`nodes`) and in memory
//! (`sim`).
//!
//! # Layout
//!
//! - [`ports`]: the [`ports::Fabric`] (pub/sub, queries, liveliness), the store port in
//!   small traits — [`ports::SeriesStore`] (history, archive), [`ports::SnapshotStore`]
//!   (snapshots, installed models, replicas), [`ports::PlacementStore`] (placement table,
//!   ε ledgers, hosted twins), [`ports::SpoolStore`] (gateway spool),
//!   [`ports::ModelStore`] (model registry), each [`ports::Durable`], and
//!   [`ports::Store`], all of them — [`ports::Clock`] and [`ports::Device`] traits.
//!   Nothing here knows Zenoh or sled.
//! - [`context`]: [`context::NodeContext`], what every actor of one node shares
//!   (ports, counters, config, the task tracker that owns every background task).
//! - [`twin`]: [`twin::TwinActor`], one per asset: ingest → durable → ack; state;
//!   set-points; RPCs; analysis; lifecycle (start, freeze, migration, passivation); the
//!   twin side of privacy and the DP releases served where the twin lives
//!   ([`twin::release`]: single twin, and set releases coordinated on the site with
//!   sealed contributions). Its own `//!` layout lists its modules.
//! - [`node`]: [`node::NodeSupervisor`], hosts and restarts the twins placed on a node.
//! - [`mesh`]: [`mesh::MeshSupervisor`], the placement authority on the cloud node.
//! - [`keeper`]: [`keeper::Keeper`], restarts the placement authority, the node
//!   supervisor and the gateway (bounded, with backoff); [`keeper::Health`] says which
//!   of them is down.
//! - [`gateway`]: [`gateway::GatewayActor`], the IoT tier: devices → numbered frames →
//!   durable spool → fabric; re-sends until acknowledged; forwards set-points.
//! - [`router`]: [`router::Router`], node-level dispatch on edges: one set of
//!   declarations per node hands frames, calls and delivery reports to the twin by id
//!   and wakes dormant (passivated) twins.
//! - [`seal`]: AES-256-GCM key rings: the site key (protected telemetry and values
//!   that cross the fabric) and the at-rest key (sensitive trees).
//! - [`metrics`]: per-node counters behind `NodeLoad` and `/metrics`.
//! - [`services`]: the info/twins queryables every node serves.
//! - [`kinds`]: asset kinds defined by Thing Models travelling with registrations to
//!   the authority, served to (and kept by) the edge and cloud nodes that need them.
//! - [`tasks`]: [`tasks::TaskController`], the one owner of background tasks (tracker +
//!   cancellation, bounded termination).
//! - [`wire`]: the typed wire: each proto message tied to its encoding, typed publish,
//!   query and reply, and the one decode → forward-to-actor loop.
//! - [`error`]: [`Error`], classified by the workspace's `ErrorCode`.
//! - [`registry`]: [`registry::Registry`], the cloud's model registry on the
//!   [`ports::ModelStore`], and its fabric service.
//! - [`assembly`]: [`assembly::Assembly`], one node put together from its ports (context,
//!   actors, queryables, load, the cloud's archive and registry, liveliness) and taken
//!   apart; `nodes` and `sim`'s cluster both use it.

pub mod assembly;
pub mod context;
pub mod error;
pub mod gateway;
pub mod keeper;
pub mod kinds;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod ports;
pub mod registry;
pub mod router;
pub mod seal;
pub mod services;
pub mod tasks;
pub mod trace;
pub mod trust;
pub mod twin;
pub mod wire;

pub use error::{Error, Result};
