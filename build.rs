//! Generates the gRPC server (and client, for the bench) of the Open Inference Protocol from
//! Triton's `grpc_service.proto` (proto/, BSD-3-Clause: see proto/LICENSE). Needs `protoc`
//! (Debian's protobuf-compiler, installed by scripts/setup.sh), or PROTOC naming one.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".")
        .compile_protos(&["proto/grpc_service.proto"], &["proto"])?;
    Ok(())
}
