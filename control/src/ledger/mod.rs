//! The append-only event log and its keyed hash chain.

pub mod chain;
