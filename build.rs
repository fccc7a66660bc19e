//! Compiles the protos with the vendored protoc, so a fresh machine needs no system protoc.
use std::{env, path::PathBuf};

use tonic_prost_build::manual;

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

    // Envoy's rate-limit service, served through the same codec. The
    // messages are envoy-types' own; only the server is generated here, so
    // no Envoy protos are needed and the route is unchanged:
    // /envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit.
    let rls = "envoy_types::pb::envoy::service::ratelimit::v3";
    let rate_limit_service = manual::Service::builder()
        .name("RateLimitService")
        .package("envoy.service.ratelimit.v3")
        .method(
            manual::Method::builder()
                .name("should_rate_limit")
                .route_name("ShouldRateLimit")
                .input_type(format!("{rls}::RateLimitRequest"))
                .output_type(format!("{rls}::RateLimitResponse"))
                .codec_path("crate::grpc::codec::StrictCodec")
                .build(),
        )
        .build();
    manual::Builder::new()
        .build_client(false)
        .compile(&[rate_limit_service]);
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
