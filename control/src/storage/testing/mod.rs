//! Test-only parts of the storage layer: the conformance suite every
//! backend runs (`crate::store_conformance!`), and an in-memory store that
//! keeps the whole contract, for the engine's property tests.

pub mod conformance;
pub mod memory;
