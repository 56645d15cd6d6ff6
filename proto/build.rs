//! Compiles `aex/v1/*.proto` with protox (a pure-Rust protobuf compiler), so
//! building needs no system `protoc`, and writes the descriptor set that
//! tonic-reflection serves.

use prost::Message;
use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "aex/v1/agents.proto",
    "aex/v1/models.proto",
    "aex/v1/admission.proto",
    "aex/v1/ledger.proto",
    "aex/v1/processes.proto",
    "aex/v1/credentials.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("aex_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
