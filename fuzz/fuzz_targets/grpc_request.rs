//! `cargo +nightly fuzz run grpc_request`: see packmeter_fuzz::grpc.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| packmeter_fuzz::grpc(data));
