//! Deterministic mesh simulation (DESIGN §7, TiKV-style): the real actors on an
//! in-memory [`fabric::Network`] (seeded delays, partitions, kills) and
//! [`store::MemStore`]s (unflushed writes lost on a crash), on tokio's paused clock.

pub mod cluster;
pub mod fabric;
pub mod store;
