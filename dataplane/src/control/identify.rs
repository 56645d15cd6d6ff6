//! Who is calling, before the request body is read (issue #31, item 9): a
//! body was read, buffered and parsed before its token was checked, so a
//! client with no valid token could make the data plane take in up to the
//! body limit per request. A token the watch stream gave this data plane is
//! known at once; any other is asked about (the `Models` admission, which
//! reserves nothing and which the control plane answers after its own
//! bounded lookup), and a token it vouches for is remembered a little while
//! (a supervised process's token, one created a moment ago).

use super::ControlPlane;
use crate::http::Credential;
use aex_core::expiring::Expiring;
use aex_proto::v1 as pb;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the data plane knows of the caller before reading its body.
#[derive(Debug)]
pub enum Identified {
    /// Known: read the body and admit the call.
    Known,
    /// The control plane refused the token (or the agent): its denial.
    Refused(pb::Denial),
    /// The control plane could not be asked.
    Unavailable(tonic::Status),
}

/// Tokens the control plane vouched for and the watch stream did not carry
/// (yet): remembered so that each of their calls does not cost an extra
/// round trip.
#[derive(Debug)]
pub struct Vouched(Expiring<Instant>);

impl Default for Vouched {
    fn default() -> Self {
        Self(Expiring::new(Self::MAX))
    }
}

impl Vouched {
    /// Long enough that a busy supervised process asks about once per
    /// this; short enough that a token revoked meanwhile (which the
    /// admission after the body refuses anyway) is soon asked about again.
    const KEPT: Duration = Duration::from_secs(10);
    /// A bound on what a stream of distinct valid tokens can make it hold;
    /// past it, everything is forgotten at once (each is asked about again).
    const MAX: usize = 4096;

    pub fn knows(&self, token_sha256: &str, now: Instant) -> bool {
        self.0.contains(token_sha256, now)
    }

    pub fn vouched(&mut self, token_sha256: &str, now: Instant) {
        self.0.insert(token_sha256, now + Self::KEPT, now);
    }
}

impl ControlPlane {
    /// Whether the caller holding `token_sha256` may go on to have its
    /// body read.
    pub async fn identify(
        self: &Arc<Self>,
        credential: &Credential,
        request_id: &str,
    ) -> Identified {
        let token_sha256 = credential.token_sha256.as_str();
        // Until the first snapshot every token is unknown here: the
        // admission after the body says what is wrong, as before.
        if !self.cache.is_ready()
            || (credential.problem.is_none() && self.cache.policy_by_token(token_sha256).is_some())
        {
            return Identified::Known;
        }
        let now = Instant::now();
        if credential.problem.is_none() && self.vouched().knows(token_sha256, now) {
            return Identified::Known;
        }
        let asked = self
            .admit(credential.admit_request(request_id, pb::Endpoint::Models))
            .await;
        match asked.map(|r| r.outcome) {
            Ok(Some(pb::admit_response::Outcome::Admitted(_))) => {
                self.vouched().vouched(token_sha256, now);
                Identified::Known
            }
            Ok(Some(pb::admit_response::Outcome::Denied(d))) => Identified::Refused(d),
            Ok(None) => Identified::Unavailable(tonic::Status::internal("an empty admission")),
            Err(status) => Identified::Unavailable(status),
        }
    }

    fn vouched(&self) -> std::sync::MutexGuard<'_, Vouched> {
        self.vouched.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vouched_tokens_are_kept_a_while_and_bounded() {
        let t0 = Instant::now();
        let mut v = Vouched::default();
        assert!(!v.knows("a", t0));
        v.vouched("a", t0);
        assert!(v.knows("a", t0 + Duration::from_secs(9)));
        assert!(!v.knows("a", t0 + Vouched::KEPT));
        for i in 0..Vouched::MAX + 10 {
            v.vouched(&format!("t{i}"), t0);
        }
        assert!(v.0.len() <= Vouched::MAX);
        let later = t0 + Vouched::KEPT;
        v.vouched("fresh", later);
        assert!(v.knows("fresh", later));
    }
}
