//! The append-only event log and its keyed hash chain.

pub mod audit;
pub mod chain;
