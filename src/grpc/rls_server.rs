//! The server for Envoy's `envoy.service.ratelimit.v3.RateLimitService`,
//! generated in build.rs over envoy-types' messages so that it decodes
//! through [`StrictCodec`](super::codec::StrictCodec): a body that does not
//! parse is INVALID_ARGUMENT naming `RateLimitRequest`, as for the Meter
//! services, not the INTERNAL of envoy-types' own server (tonic's default
//! codec). The route, the trait `RateLimitService` and the server type
//! `RateLimitServiceServer` are the same as envoy-types'.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

include!(concat!(
    env!("OUT_DIR"),
    "/envoy.service.ratelimit.v3.RateLimitService.rs"
));
