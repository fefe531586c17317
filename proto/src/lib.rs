//! twinmesh wire contract: the protobuf messages and gRPC services of `package twinmesh.v1`
//! (DESIGN §6 and §9), generated at build time from `proto/twinmesh/v1/*.proto`.
//!
//! # Layout
//!
//! - [`v1`]: generated prost messages, tonic clients/servers (`v1::twin_service_client`, ...)
//!   and proto3-JSON serde impls (pbjson), so `serde_json::to_string(&msg)` gives the
//!   canonical JSON mapping with lowerCamelCase field names.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.
//! - [`encoding`]: the Zenoh encoding string of each message (`application/protobuf;<Name>`).
//!
//! Generated code is never edited by hand; conversions to domain types live in the
//! crates that own those types.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("twinmesh.v1");
    include!(concat!(env!("OUT_DIR"), "/twinmesh.v1.serde.rs"));
}

/// Encoded `FileDescriptorSet` of every twinmesh proto file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/twinmesh_descriptor.bin"));

/// Zenoh encodings (`application/protobuf;<MessageName>`) of the messages carried on the
/// key space, so clients in any language know how to decode a sample.
pub mod encoding {
    pub const TELEMETRY_FRAME: &str = "application/protobuf;TelemetryFrame";
    pub const IDENTIFIER_BATCH: &str = "application/protobuf;IdentifierBatch";
    pub const TWIN_STATE: &str = "application/protobuf;TwinState";
    pub const FEATURE_SET: &str = "application/protobuf;FeatureSet";
    pub const TWIN_EVENT: &str = "application/protobuf;TwinEvent";
    pub const NODE_INFO: &str = "application/protobuf;NodeInfo";
    pub const NODE_LOAD: &str = "application/protobuf;NodeLoad";
    pub const NODE_TWINS: &str = "application/protobuf;NodeTwins";
    pub const TWIN_REQUEST: &str = "application/protobuf;TwinRequest";
    pub const TWIN_REPLY: &str = "application/protobuf;TwinReply";
    pub const WATERMARK: &str = "application/protobuf;Watermark";
    pub const DESIRED_UPDATE: &str = "application/protobuf;DesiredUpdate";
    pub const PLACEMENT: &str = "application/protobuf;Placement";
    pub const PLACEMENT_REQUEST: &str = "application/protobuf;PlacementRequest";
    pub const PLACEMENT_QUERY: &str = "application/protobuf;PlacementQuery";
    pub const CHAIN_UPDATE: &str = "application/protobuf;ChainUpdate";
    pub const TWIN_SNAPSHOT: &str = "application/protobuf;TwinSnapshot";
    pub const REPLAY_REQUEST: &str = "application/protobuf;ReplayRequest";
    pub const MESH_REQUEST: &str = "application/protobuf;MeshRequest";
    pub const MESH_REPLY: &str = "application/protobuf;MeshReply";
    pub const MODEL_RECORD: &str = "application/protobuf;ModelRecord";
    pub const PRIVACY_POLICY: &str = "application/protobuf;PrivacyPolicy";
}
