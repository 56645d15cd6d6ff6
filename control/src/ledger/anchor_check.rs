//! At start: does the database reach the head the anchor file recorded?
//! The decision, for either store; the store reads the facts, appends the
//! event this returns before anything is admitted, then anchors its head.
//!
//! A database that ends before the anchor (events removed, or all of them),
//! a different event at the anchored position, or an anchor that is missing
//! or forged once this anchor was started, is recorded as a chained
//! `ledger.head_mismatch` event, so it fails every later audit and cannot be
//! erased without breaking the chain; the rejected anchor file is kept
//! beside it. The control plane then carries on from the database as it is
//! (an attacker who can edit the database can stop it anyway).

use super::anchor::{Anchor, AnchorState};
use crate::clock::now_ms;
use aex_core::event::{EventKind, Head, NewEvent};
use serde_json::json;
use std::path::Path;

/// What the store read, in one go, before its writer starts.
pub struct StartFacts {
    pub state: AnchorState,
    pub db_head: Head,
    /// The hash of the event at the anchored seq (`genesis` for 0), if any.
    pub hash_at_anchor: Option<String>,
    /// Whether the chain holds a `ledger.anchored` event for this anchor.
    pub anchored_before: bool,
}

struct Mismatch {
    reason: &'static str,
    message: String,
    anchor: Option<Anchor>,
}

fn mismatch(path: &Path, f: &StartFacts) -> Option<Mismatch> {
    let db_seq = f.db_head.seq;
    match &f.state {
        AnchorState::Present(a) if f.hash_at_anchor.as_deref() == Some(a.hash.as_str()) => None,
        AnchorState::Present(a) if db_seq < a.seq => Some(Mismatch {
            reason: if db_seq == 0 { "wiped" } else { "truncated" },
            message: format!(
                "the database ends at event {db_seq} but the anchor (written at {} ms) says the chain reached event {}: {} event(s) removed",
                a.written_at_ms,
                a.seq,
                a.seq - db_seq
            ),
            anchor: Some(a.clone()),
        }),
        AnchorState::Present(a) => Some(Mismatch {
            reason: "rewritten",
            message: format!(
                "event {} is not the one the anchor recorded: the chain was replaced from there",
                a.seq
            ),
            anchor: Some(a.clone()),
        }),
        AnchorState::Missing if f.anchored_before => Some(Mismatch {
            reason: "anchor_missing",
            message: format!(
                "{} is missing although this chain was anchored",
                path.display()
            ),
            anchor: None,
        }),
        AnchorState::Missing => None,
        // The valid slot first: a chain short of it says more.
        AnchorState::Damaged { newest, why } => mismatch(
            path,
            &StartFacts {
                state: AnchorState::Present(newest.clone()),
                db_head: f.db_head.clone(),
                hash_at_anchor: f.hash_at_anchor.clone(),
                anchored_before: f.anchored_before,
            },
        )
        .or_else(|| {
            Some(Mismatch {
                reason: "anchor_slot_invalid",
                message: why.clone(),
                anchor: Some(newest.clone()),
            })
        }),
        AnchorState::Invalid(why) => Some(Mismatch {
            reason: "anchor_invalid",
            message: why.clone(),
            anchor: None,
        }),
    }
}

/// The event to append at start: a mismatch, the first start of this
/// anchor (`anchored_as` names it in the chain), or none. A mismatch keeps
/// the rejected file as `*.head.rejected-<ms>` first.
pub fn start_event(
    path: &Path,
    facts: &StartFacts,
    anchored_as: &str,
) -> std::io::Result<Option<NewEvent>> {
    let now = now_ms();
    let Some(m) = mismatch(path, facts) else {
        return Ok(matches!(facts.state, AnchorState::Missing).then(|| {
            NewEvent::ledger(
                now,
                EventKind::LedgerAnchored,
                "",
                json!({"anchor": anchored_as, "head_seq": facts.db_head.seq}),
            )
        }));
    };
    if path.exists() {
        // Keep the evidence before the anchor is rewritten.
        let kept = path.with_extension(format!("head.rejected-{now}"));
        std::fs::copy(path, &kept)?;
    }
    tracing::error!(reason = m.reason, message = %m.message, "the ledger does not reach its anchored head; recorded in the chain (run `aexctl audit`)");
    let details = json!({
        "message": m.message,
        "anchor_seq": m.anchor.as_ref().map(|a| a.seq),
        "anchor_hash": m.anchor.as_ref().map(|a| a.hash.clone()),
        "anchor_written_at_ms": m.anchor.as_ref().map(|a| a.written_at_ms),
        "db_seq": facts.db_head.seq, "db_hash": facts.db_head.hash,
    });
    Ok(Some(NewEvent::ledger(
        now,
        EventKind::LedgerHeadMismatch,
        m.reason,
        details,
    )))
}
