//! Audit against every single edit of a log (`edit_properties.rs`).

mod edit_properties;
