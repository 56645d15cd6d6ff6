//! One audit of a store: the chain verified and tallied page by page, the
//! folds compared with the stored rows, the invariants checked. The checks
//! are pure (`ledger::audit`, `ledger::fold`); this drives them over any
//! [`Store`].

use crate::clock::now_ms;
use crate::error::Error;
use crate::ledger::audit::{
    Check, LogTally, invariants, reservations_match_log, reservations_replayed,
};
use crate::ledger::verify::ChainVerifier;
use crate::storage::{EventFilter, Store};

/// Agents whose reservations one audit itemizes row by row.
const REPLAYED_AGENTS_MAX: usize = 20;

/// What one audit found.
#[derive(Debug)]
pub struct Audit {
    /// The chain first, then the folds, then the invariants.
    pub checks: Vec<Check>,
    pub events_checked: u64,
    /// Agents with recorded overruns (never charged).
    pub overruns: Vec<String>,
}

impl Audit {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// The checks that failed, with their offenders, for a message.
    pub fn failures(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{}: {} {:?}", c.name, c.detail, c.offenders))
            .collect()
    }
}

pub async fn audit_store(store: &dyn Store, ledger_key: &[u8]) -> Result<Audit, Error> {
    let mut data = store.audit_data(now_ms()).await?;
    let mut verifier = ChainVerifier::new(ledger_key);
    let mut tally = LogTally::new(ledger_key);
    let mut after_seq = 0;
    // Up to the snapshot's last event: later ones belong to the next audit.
    // Hashing a page is CPU work (tens of ms per 10,000 events), so it
    // runs off the runtime that serves admissions.
    let last_seq = data.last_seq;
    while after_seq < last_seq {
        let page = store
            .list_events(EventFilter {
                after_seq,
                limit: 10_000,
                ..Default::default()
            })
            .await?;
        let Some(last) = page.last() else { break };
        after_seq = last.body.seq;
        (verifier, tally) = tokio::task::spawn_blocking(move || {
            for e in page.iter().take_while(|e| e.body.seq <= last_seq) {
                verifier.push(e);
                tally.push(e);
            }
            (verifier, tally)
        })
        .await
        .map_err(|e| Error::Internal(format!("audit worker failed: {e}")))?;
    }
    let counted = tally.events_counted(data.counters.values().sum());
    let key = ledger_key;
    let agents = tally.agents_match_log(&data.agents, key);
    let processes = tally.processes_match_log(&data.processes, key);
    let grants = tally.grants_match_log(&data.grants);
    let credentials = tally.credentials_match_log(&data.credentials, key);
    let reported = tally.reported_calls_recorded();
    let (mut reservation_offenders, differing) = tally.reservations_against(&data);
    // Itemizing reads an agent's whole history: enough of them to act
    // on, and a count of the rest.
    for agent_id in differing.iter().take(REPLAYED_AGENTS_MAX) {
        let (rows, events) = store.reservation_history(agent_id).await?;
        reservation_offenders.extend(reservations_replayed(key, &rows, &events));
    }
    if differing.len() > REPLAYED_AGENTS_MAX {
        reservation_offenders.push(format!(
            "and {} more agents whose closed reservations differ from the log (not itemized)",
            differing.len() - REPLAYED_AGENTS_MAX
        ));
    }
    tally.into_data(&mut data);
    let checked = verifier.checked();
    let chain = verifier.finish(counted);
    let (mut checks, overruns) = invariants(&data);
    checks.insert(0, chain);
    checks.insert(1, agents);
    checks.insert(2, reservations_match_log(reservation_offenders));
    checks.insert(3, grants);
    checks.insert(4, processes);
    checks.insert(5, credentials);
    checks.insert(6, reported);
    Ok(Audit {
        checks,
        events_checked: checked,
        overruns,
    })
}
