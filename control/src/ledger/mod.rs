//! The append-only event log and its keyed hash chain.

pub mod anchor;
pub mod audit;
pub mod chain;
pub mod fold;
