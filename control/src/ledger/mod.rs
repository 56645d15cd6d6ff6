//! The append-only event log: its head anchor, the folds of stored state,
//! and the audit. The keyed hash chain itself is `aex_core::chain`.

pub mod anchor;
pub mod anchor_check;
pub mod audit;
pub mod fold;
pub mod run;
#[cfg(test)]
mod tests;
