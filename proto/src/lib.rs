//! The `aex.v1` API: messages and tonic clients/servers generated from
//! `proto/aex/v1/*.proto`.

#![allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]

pub mod convert;
pub mod tls;

pub mod v1 {
    tonic::include_proto!("aex.v1");

    /// Encoded `FileDescriptorSet` for tonic-reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/aex_descriptor.bin"));
}
