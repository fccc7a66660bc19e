//! Compiles the protos with the vendored protoc, so a fresh machine needs no system protoc.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through this variable; build scripts are single threaded.
    env::set_var("PROTOC", protoc);
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Malformed requests are INVALID_ARGUMENT; see src/grpc/codec.rs.
        .codec_path("crate::grpc::codec::StrictCodec")
        .file_descriptor_set_path(out.join("packmeter_descriptor.bin"))
        .compile_protos(&["proto/packmeter/v1/packmeter.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
