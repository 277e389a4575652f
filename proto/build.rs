//! Compiles the protobuf contract with protox (pure Rust), so that no system `protoc`
//! is needed, and keeps the descriptor set for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/nanofleet/v1/fleet.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("nanofleet_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Artifact bytes are sliced out of the received buffer rather than copied.
        .bytes(".nanofleet.v1.ChunkData.data")
        .compile_fds(fds)?;
    Ok(())
}
