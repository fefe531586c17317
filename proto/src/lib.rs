//! twinmesh wire contract: the protobuf messages and gRPC services of `package twinmesh.v1`
//! (DESIGN §6 and §9), generated at build time from `proto/twinmesh/v1/*.proto`.
//!
//! # Layout
//!
//! - [`v1`]: generated prost messages, tonic clients/servers (`v1::twin_service_client`, ...)
//!   and proto3-JSON serde impls (pbjson), so `serde_json::to_string(&msg)` gives the
//!   canonical JSON mapping with lowerCamelCase field names.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.
//! - [`Wire`]: the messages that cross Zenoh, each tied to its encoding
//!   (`application/protobuf;<Name>`).
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

/// A message that crosses the Zenoh fabric (DESIGN §6), tied to its encoding
/// (`application/protobuf;<MessageName>`) in this one place, so clients in any language
/// know how to decode a sample and no publisher pairs a message with a string by hand.
pub trait Wire: prost::Message + Default + Send + Sync + 'static {
    /// The message's name in `package twinmesh.v1`.
    const NAME: &'static str;
    /// Its Zenoh encoding.
    const ENCODING: &'static str;
}

macro_rules! wire {
    ($($name:ident),* $(,)?) => {$(
        impl Wire for v1::$name {
            const NAME: &'static str = stringify!($name);
            const ENCODING: &'static str = concat!("application/protobuf;", stringify!($name));
        }
    )*};
}

wire!(
    TelemetryFrame,
    IdentifierBatch,
    TwinState,
    FeatureSet,
    TwinEvent,
    NodeInfo,
    NodeLoad,
    NodeTwins,
    TwinRequest,
    TwinReply,
    Watermark,
    DesiredUpdate,
    Placement,
    PlacementRequest,
    PlacementQuery,
    KindModel,
    ChainUpdate,
    TwinSnapshot,
    ReplayRequest,
    MeshRequest,
    MeshReply,
    ModelRecord,
    PrivacyPolicy,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_name_their_messages() {
        assert_eq!(
            v1::TelemetryFrame::ENCODING,
            "application/protobuf;TelemetryFrame"
        );
        assert_eq!(v1::TwinReply::NAME, "TwinReply");
    }
}
