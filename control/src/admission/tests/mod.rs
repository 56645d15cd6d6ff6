//! The admission engine under random interleavings (`properties.rs`) and
//! its kill orders (`kill_orders.rs`), over the in-memory store.

mod kill_orders;
mod properties;
