//! The wire contract of nanofleet (`nanofleet.v1`): generated protobuf types and tonic
//! client/server stubs. Generated code only; domain logic lives in the crates that use it.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("nanofleet.v1");

    /// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/nanofleet_descriptor.bin"));
}
