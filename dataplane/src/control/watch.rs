//! What the data plane keeps up with while it runs: the watch stream that
//! feeds the cache, and heartbeats that keep long streams' reservations open.

use super::ControlPlane;
use super::backoff::Backoff;
use aex_proto::v1 as pb;
use std::sync::Arc;
use std::time::Duration;

impl ControlPlane {
    /// Keeps the watch stream connected for as long as the process runs.
    pub async fn watch_forever(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let mut client = self.client.clone();
            match client.watch(pb::WatchRequest {}).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    // Pages of a snapshot too big for one message, applied
                    // with the snapshot that ends them; until then this data
                    // plane is not ready (it would refuse tokens it has not
                    // received yet).
                    let mut pages: Vec<pb::AgentPolicy> = Vec::new();
                    let mut complete = false;
                    loop {
                        let event = match stream.message().await {
                            Ok(Some(event)) => event,
                            Ok(None) => {
                                tracing::warn!(
                                    "the control plane ended the watch stream; reconnecting"
                                );
                                break;
                            }
                            Err(status) => {
                                // Not a blip to retry quietly: a message this
                                // data plane cannot read (too large, another
                                // version) would fail the same way forever.
                                tracing::error!(
                                    %status,
                                    "the watch stream from the control plane failed; this data plane is not \
                                     ready until it receives the agents and models in full (if this repeats, \
                                     check that both planes run the same AEX version)"
                                );
                                break;
                            }
                        };
                        match event.change {
                            Some(pb::watch_event::Change::SnapshotPart(page)) => {
                                pages.extend(page.agents);
                            }
                            Some(pb::watch_event::Change::Snapshot(mut last)) => {
                                pages.append(&mut last.agents);
                                last.agents = std::mem::take(&mut pages);
                                let change = pb::watch_event::Change::Snapshot(last);
                                self.grants_see(&change);
                                self.cache.apply(change);
                                complete = true;
                                backoff.reset();
                            }
                            Some(change) => {
                                self.grants_see(&change);
                                self.cache.apply(change);
                            }
                            None => {}
                        }
                        if complete && self.cache.has_routes() {
                            self.cache.set_ready(true);
                        }
                    }
                }
                Err(status) => {
                    tracing::warn!(%status, "cannot watch the control plane; retrying");
                }
            }
            self.cache.set_ready(false);
            backoff.wait().await;
        }
    }

    /// Extends the reservations of calls still running, so long streams do
    /// not expire while they are being served.
    pub async fn heartbeat_forever(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let ids: Vec<String> = self
                .open
                .lock()
                .expect("open lock")
                .iter()
                .cloned()
                .collect();
            if ids.is_empty() {
                continue;
            }
            let mut client = self.client.clone();
            if let Err(status) = client
                .heartbeat(pb::HeartbeatRequest {
                    reservation_ids: ids,
                })
                .await
            {
                tracing::warn!(%status, "heartbeat failed");
            }
        }
    }
}
