//! Compiles the contract in `proto/` with protox (pure Rust, no system
//! `protoc`) and keeps an encoded descriptor set, imports included, for server
//! reflection so grpcurl can resolve every type without local proto files.
use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/datastorage/v1/audit.proto",
    "proto/datastorage/v1/audit_write.proto",
    "proto/datastorage/v1/incident.proto",
    "proto/datastorage/v1/incident_query.proto",
    "proto/datastorage/v1/vector_search.proto",
    "proto/datastorage/v1/job_status.proto",
    "proto/google/rpc/status.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // tonic-prost-build 0.14 no longer emits these, so without them every build reruns.
    println!("cargo:rerun-if-changed=build.rs");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTOS)?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("datastorage_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // google.rpc.Status and the error details come from tonic-types, so the
        // Status in Job.error is the same type the error mapping produces.
        .extern_path(".google.rpc", "::tonic_types::pb")
        // prost's codec, but undecodable requests are INVALID_ARGUMENT (src/grpc/codec.rs).
        .codec_path("crate::grpc::codec::ProtoCodec")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
