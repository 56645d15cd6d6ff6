//! Admission: the hot path. Decides every model call from in-memory state
//! (agents by token hash, rate limiters, open reservations) and touches the
//! database only to reserve and to settle, each one transaction.

pub mod engine;
pub use aex_core::policy;
#[cfg(test)]
mod tests;
