//! Code generated from `proto/` by `build.rs`.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod v1 {
    tonic::include_proto!("datastorage.v1");
}

/// Every file of the contract and its imports (google/protobuf, google/rpc),
/// encoded, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/datastorage_descriptor.bin"));
