//! `cargo +nightly fuzz run journal_decode`: see packmeter_fuzz::journal.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| packmeter_fuzz::journal(data));
