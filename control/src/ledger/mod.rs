//! The append-only event log: its head anchor, the folds of stored state,
//! and the audit's checks, pure over what a store read (`snapshot`): below
//! the stores, which use its formats. Running an audit over a store is
//! `crate::audit`. The keyed hash chain itself is `aex_core::chain`.

pub mod anchor;
pub mod anchor_check;
pub mod audit;
pub mod fold;
pub mod snapshot;
#[cfg(test)]
mod tests;
pub mod verify;
