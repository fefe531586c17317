//! Generates the prost messages, tonic services and proto3-JSON (pbjson) serde impls
//! for `package twinmesh.v1`, with a vendored protoc: no system protoc needed.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "twinmesh/v1/common.proto",
    "twinmesh/v1/twin.proto",
    "twinmesh/v1/mesh.proto",
    "twinmesh/v1/fabric.proto",
    "twinmesh/v1/model.proto",
    "twinmesh/v1/privacy.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; this only affects this process.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("twinmesh_descriptor.bin");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    // Maps as BTreeMap: a message encodes to the same bytes every time, which the
    // proofs on the fabric (HMAC over the encoding) rely on.
    tonic_prost_build::configure()
        .btree_map(".")
        .file_descriptor_set_path(&descriptor_path)
        .compile_protos(PROTOS, &["."])?;

    let descriptors = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .emit_fields()
        .btree_map([".twinmesh"])
        .build(&[".twinmesh"])?;
    Ok(())
}
