//! gRPC handlers: thin adapters from protobuf to the domain and storage.

pub mod admission;
pub mod agents;
mod batch;
pub mod convert;
pub mod credentials;
pub mod ledger;
pub mod models;
pub mod processes;
mod report;
mod settle;
