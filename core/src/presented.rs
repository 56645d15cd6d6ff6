//! The AEX token a request presents, and why one is not accepted (issue
//! #33, item 3): a client told only "invalid API key" cannot tell a
//! missing variable from a misspelt header, a stale token, or an agent an
//! operator deleted. Each case has its own 401 here, decided once for both
//! planes: the data plane finds what the request carries ([`presented`]),
//! the control plane says what the ledger knows of a token no agent holds
//! ([`Retired`]).

use crate::denial::Rule;
use crate::event::EventKind;
use crate::policy::Denial;

crate::named::named_set! {
    /// A header a client may carry its token in. The names are the
    /// headers' (and a 401 names the one that was wrong).
    TokenHeader {
        /// `Authorization: Bearer <token>`: OpenAI's SDKs and most clients.
        Authorization => "authorization",
        /// Anthropic's SDKs and Claude Code.
        XApiKey => "x-api-key",
        /// Azure OpenAI's clients (the OpenAI SDKs' `AzureOpenAI`).
        ApiKey => "api-key",
    }
}

crate::named::named_set! {
    /// Why a request presents no usable token. The names are the wire form
    /// (`AdmitRequest.credential_problem`).
    Problem {
        /// None of the headers is there.
        Missing => "missing",
        /// `Authorization` without the `Bearer` scheme and a token.
        MalformedAuthorization => "malformed_authorization",
        /// An empty `x-api-key`, or one that is not visible ASCII.
        MalformedXApiKey => "malformed_x_api_key",
        MalformedApiKey => "malformed_api_key",
        /// A name a newer data plane sent that this control plane does not
        /// know: no usable token all the same.
        Unrecognized => "unrecognized",
    }
}

/// The token a request presents: the first usable one of `Authorization`
/// (the `Bearer` scheme, any case), `x-api-key`, `api-key`; when none is
/// usable, what is wrong with the first header that is there, or that none
/// is. `header` gives a header's raw value.
pub fn presented<'a>(header: impl Fn(TokenHeader) -> Option<&'a [u8]>) -> Result<&'a str, Problem> {
    let mut problem = Problem::Missing;
    for name in TokenHeader::ALL.iter().copied() {
        let Some(raw) = header(name) else { continue };
        match usable(name, raw) {
            Some(token) => return Ok(token),
            None if problem == Problem::Missing => problem = Problem::malformed(name),
            None => {}
        }
    }
    Err(problem)
}

/// The token a header's value carries, if it carries one as it should.
fn usable(name: TokenHeader, raw: &[u8]) -> Option<&str> {
    // Visible ASCII and spaces only: what a token is, and what a header
    // value may hold without surprise.
    let value = std::str::from_utf8(raw).ok()?.trim();
    if value.bytes().any(|b| !(b == b' ' || b.is_ascii_graphic())) {
        return None;
    }
    let token = match name {
        TokenHeader::Authorization => {
            let (scheme, rest) = value.split_once(' ')?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return None;
            }
            rest.trim()
        }
        TokenHeader::XApiKey | TokenHeader::ApiKey => value,
    };
    (!token.is_empty() && !token.contains(' ')).then_some(token)
}

impl Problem {
    fn malformed(header: TokenHeader) -> Self {
        match header {
            TokenHeader::Authorization => Problem::MalformedAuthorization,
            TokenHeader::XApiKey => Problem::MalformedXApiKey,
            TokenHeader::ApiKey => Problem::MalformedApiKey,
        }
    }

    pub fn from_wire(s: &str) -> Option<Self> {
        if s.is_empty() {
            return None;
        }
        Some(Self::parse(s).unwrap_or(Problem::Unrecognized))
    }

    pub fn to_wire(this: Option<Self>) -> String {
        this.map_or_else(String::new, |p| p.as_str().to_string())
    }

    /// The 401 it is answered with.
    pub fn denial(self) -> Denial {
        const WHERE: &str = "Send the agent's token as `Authorization: Bearer <token>` (the OpenAI SDKs' \
             api_key, OPENAI_API_KEY) or alone in `x-api-key` (the Anthropic SDKs' api_key, \
             ANTHROPIC_API_KEY); `aexctl agent create` prints one, `aexctl run` sets both.";
        let message = match self {
            Problem::Missing => format!("No API key: the request carries no AEX token. {WHERE}"),
            Problem::MalformedAuthorization => format!(
                "Malformed Authorization header: AEX expects `Authorization: Bearer <token>` (the \
                 word Bearer, a space, then the token), and it has another form. {WHERE}"
            ),
            Problem::MalformedXApiKey | Problem::MalformedApiKey => format!(
                "Malformed {} header: it must hold the token alone (visible ASCII, no spaces), and \
                 it is empty or holds something else. {WHERE}",
                if self == Problem::MalformedXApiKey {
                    TokenHeader::XApiKey
                } else {
                    TokenHeader::ApiKey
                }
            ),
            Problem::Unrecognized => format!("The request carries no usable AEX token. {WHERE}"),
        };
        Denial::unauthenticated(Rule::Auth, message)
    }
}

/// What the ledger knows of a token no agent holds any more: the event that
/// committed to it (its `token_mac`) and what ended it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retired {
    /// Replaced by `aexctl agent rotate-token`.
    Rotated { agent: String, at_ms: i64 },
    /// Its agent was deleted.
    Deleted { agent: String, at_ms: i64 },
    /// A supervised process's token (`aexctl run`), valid only while it runs.
    RunToken { agent: String, started_at_ms: i64 },
}

impl Retired {
    /// Folds the event that issued the token and the first of the agent's
    /// later `agent.token_rotated` or `agent.deleted` events (`ended`) into
    /// what became of it; `None` while it is still the agent's token.
    pub fn of(
        agent: &str,
        issued: (EventKind, i64),
        ended: Option<(EventKind, i64)>,
    ) -> Option<Self> {
        let agent = agent.to_string();
        match issued.0 {
            EventKind::ProcessStarted => Some(Retired::RunToken {
                agent,
                started_at_ms: issued.1,
            }),
            EventKind::AgentCreated | EventKind::AgentTokenRotated | EventKind::AgentBaseline => {
                match ended? {
                    (EventKind::AgentTokenRotated, at_ms) => {
                        Some(Retired::Rotated { agent, at_ms })
                    }
                    (EventKind::AgentDeleted, at_ms) => Some(Retired::Deleted { agent, at_ms }),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// The kinds of event that commit to an agent's or a process's token.
    pub const ISSUED_BY: &'static [EventKind] = &[
        EventKind::AgentCreated,
        EventKind::AgentTokenRotated,
        EventKind::AgentBaseline,
        EventKind::ProcessStarted,
    ];

    /// The kinds of event that end an agent's token.
    pub const ENDED_BY: &'static [EventKind] =
        &[EventKind::AgentTokenRotated, EventKind::AgentDeleted];

    /// The 401 it is answered with.
    pub fn denial(&self) -> Denial {
        let at = |ms: i64| crate::time::rfc3339(ms);
        let message = match self {
            Retired::Rotated { agent, at_ms } => format!(
                "Invalid API key: this token was agent '{agent}''s until it was rotated at {}. Use the \
                 token that rotation printed, or issue another with `aexctl agent rotate-token {agent}`.",
                at(*at_ms)
            ),
            Retired::Deleted { agent, at_ms } => format!(
                "Invalid API key: this token was agent '{agent}''s, and the agent was deleted at {}. \
                 Create an agent with `aexctl agent create` and use its token.",
                at(*at_ms)
            ),
            Retired::RunToken {
                agent,
                started_at_ms,
            } => format!(
                "Invalid API key: this token was given to a process `aexctl run` started at {} for agent \
                 '{agent}'; a run's token is valid only while that process runs. Start it again with \
                 `aexctl run --agent {agent} -- …`.",
                at(*started_at_ms)
            ),
        };
        Denial::unauthenticated(Rule::Auth, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with<'a>(headers: &'a [(&'a str, &'a [u8])]) -> Result<&'a str, Problem> {
        presented(|name| {
            headers
                .iter()
                .find(|(n, _)| *n == name.as_str())
                .map(|(_, v)| *v)
        })
    }

    #[test]
    fn the_first_usable_token_is_presented_else_the_first_problem() {
        assert_eq!(with(&[("authorization", b"Bearer aex_1")]), Ok("aex_1"));
        assert_eq!(with(&[("authorization", b"bearer  aex_1 ")]), Ok("aex_1"));
        assert_eq!(with(&[("authorization", b"BEARER aex_1")]), Ok("aex_1"));
        assert_eq!(with(&[("x-api-key", b" aex_2 ")]), Ok("aex_2"));
        assert_eq!(with(&[("api-key", b"aex_3")]), Ok("aex_3"));
        assert_eq!(
            with(&[("authorization", b"Bearer aex_1"), ("x-api-key", b"aex_2")]),
            Ok("aex_1")
        );
        // A proxy's own Authorization does not hide a token in x-api-key.
        assert_eq!(
            with(&[
                ("authorization", b"Basic dXNlcg=="),
                ("x-api-key", b"aex_2")
            ]),
            Ok("aex_2")
        );
        assert_eq!(with(&[]), Err(Problem::Missing));
        for bad in [
            &b"aex_1"[..],
            b"Bearer",
            b"Bearer ",
            b"Basic dXNlcg==",
            b"Bearer a b",
            b"Bearer aex_\xff",
            b"Bearer aex\t1",
        ] {
            assert_eq!(
                with(&[("authorization", bad)]),
                Err(Problem::MalformedAuthorization),
                "{bad:?}"
            );
        }
        assert_eq!(with(&[("x-api-key", b"")]), Err(Problem::MalformedXApiKey));
        assert_eq!(
            with(&[("x-api-key", b"  "), ("api-key", b"a b")]),
            Err(Problem::MalformedXApiKey)
        );
        assert_eq!(
            with(&[("api-key", b"a\x01")]),
            Err(Problem::MalformedApiKey)
        );
    }

    #[test]
    fn each_problem_says_its_own_thing_and_round_trips() {
        let messages: std::collections::HashSet<_> =
            Problem::ALL.iter().map(|p| p.denial().message).collect();
        assert_eq!(messages.len(), Problem::ALL.len());
        for p in Problem::ALL {
            assert_eq!(Problem::from_wire(&Problem::to_wire(Some(*p))), Some(*p));
            assert_eq!(p.denial().http_status, 401);
            assert_eq!(p.denial().denied_by, Rule::Auth);
        }
        assert_eq!(Problem::from_wire(""), None);
        assert_eq!(Problem::from_wire("newer"), Some(Problem::Unrecognized));
        assert!(
            Problem::MalformedApiKey
                .denial()
                .message
                .contains("Malformed api-key header")
        );
    }

    #[test]
    fn a_retired_token_is_told_what_ended_it() {
        use EventKind::*;
        let t = 1_771_586_980_000;
        assert_eq!(Retired::of("a", (AgentCreated, 1), None), None);
        assert_eq!(
            Retired::of("a", (AgentCreated, 1), Some((AgentTokenRotated, t))),
            Some(Retired::Rotated {
                agent: "a".into(),
                at_ms: t
            })
        );
        assert_eq!(
            Retired::of("a", (AgentTokenRotated, 1), Some((AgentDeleted, t))),
            Some(Retired::Deleted {
                agent: "a".into(),
                at_ms: t
            })
        );
        assert_eq!(
            Retired::of("a", (ProcessStarted, t), None),
            Some(Retired::RunToken {
                agent: "a".into(),
                started_at_ms: t
            })
        );
        assert_eq!(Retired::of("a", (Settle, 1), Some((AgentDeleted, t))), None);
        let rotated = Retired::of("a", (AgentBaseline, 1), Some((AgentTokenRotated, t))).unwrap();
        assert!(
            rotated
                .denial()
                .message
                .contains("rotated at 2026-02-20T11:29:40Z"),
            "{}",
            rotated.denial().message
        );
    }
}
