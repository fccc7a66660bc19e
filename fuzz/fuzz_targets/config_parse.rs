//! `cargo +nightly fuzz run config_parse`: see packmeter_fuzz::config.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| packmeter_fuzz::config(data));
