//! The `packmeter` binary: the command line. `serve` hands the parsed
//! configuration to the library ([`packmeter::server`]); the client
//! commands and `packmeter loadgen` live here, in the binary, so that the
//! server library does not link client tooling (indicatif, hdrhistogram).

mod cli;
mod loadgen;

fn main() -> std::process::ExitCode {
    cli::main()
}
