//! CORS for browser-based agents (issue #33), off unless the operator
//! lists origins (`--cors-origins`). A listed origin's preflight is
//! answered and its responses carry `Access-Control-Allow-Origin` with the
//! headers an SDK reads (request id, denials, waits, cost); any other
//! origin gets none of them, so a page it serves cannot read AEX's
//! answers, and no response ever carries `Access-Control-Allow-Credentials`
//! (AEX takes no cookies: the agent's token is sent as a header).
//!
//! Whether a request's origin is listed is decided once, when it arrives,
//! and kept in the request's extensions, so every path that answers —
//! errors included, which a browser otherwise hides from the page — adds
//! the same headers through [`decorate`].

use pingora_core::protocols::http::ServerSession;
use pingora_http::ResponseHeader;

/// The origins allowed, exactly as browsers send them
/// (`scheme://host[:port]`, no path).
#[derive(Debug, Clone, Default)]
pub struct Cors {
    origins: Vec<String>,
}

/// The listed origin of the request being answered.
#[derive(Debug, Clone)]
struct Allowed(http::HeaderValue);

/// What a browser may call: the APIs' methods.
const METHODS: &str = "GET, POST, OPTIONS";
/// How long a browser may keep a preflight's answer (seconds): long enough
/// to spare a round trip per call, short enough that a change of the list
/// reaches open pages soon.
const MAX_AGE_SECONDS: &str = "600";
/// The response headers a page's SDK may read.
const EXPOSED: &str = "x-aex-request-id, x-aex-denied-by, x-aex-cost-micro, x-aex-remaining-micro, \
     x-aex-provider-model, \
     x-aex-token-count, x-aex-untranslated, retry-after, retry-after-ms, x-should-retry, \
     request-id, x-request-id";
/// The most request headers a preflight may ask for (bytes): the SDKs ask
/// for a dozen short names.
const MAX_REQUESTED_HEADERS_BYTES: usize = 2048;

/// Why a CORS list is refused at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadOrigin(pub String);

impl std::fmt::Display for BadOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--cors-origins: '{}' is not an origin; write each as scheme://host[:port] \
             (e.g. http://localhost:5173), comma-separated",
            self.0
        )
    }
}

impl Cors {
    /// `list`: comma-separated origins; empty means CORS off. `*` is
    /// refused: an operator names the pages that may spend an agent's
    /// budget.
    pub fn parse(list: &str) -> Result<Self, BadOrigin> {
        let mut origins = Vec::new();
        for origin in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let origin = origin.trim_end_matches('/');
            let valid = origin.split_once("://").is_some_and(|(scheme, host)| {
                matches!(scheme, "http" | "https")
                    && !host.is_empty()
                    && !host.contains(['/', '*', ' ', '?', '#'])
            });
            if !valid {
                return Err(BadOrigin(origin.to_string()));
            }
            origins.push(origin.to_ascii_lowercase());
        }
        Ok(Self { origins })
    }

    pub fn is_off(&self) -> bool {
        self.origins.is_empty()
    }

    /// Notes on the request whether its `Origin` is listed.
    pub fn admit_origin(&self, session: &mut ServerSession) {
        if self.is_off() {
            return;
        }
        let listed = session
            .get_header("origin")
            .filter(|o| {
                o.to_str()
                    .is_ok_and(|o| self.origins.iter().any(|l| l.eq_ignore_ascii_case(o)))
            })
            .cloned();
        if let Some(origin) = listed {
            session
                .req_header_mut()
                .extensions_mut()
                .insert(Allowed(origin));
        }
    }
}

/// Whether the request is a CORS preflight (`OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`).
pub fn is_preflight(session: &ServerSession) -> bool {
    let req = session.req_header();
    req.method == http::Method::OPTIONS
        && req.headers.contains_key("origin")
        && req.headers.contains_key("access-control-request-method")
}

/// Whether the request's origin is listed (see [`Cors::admit_origin`]).
pub fn is_allowed(session: &ServerSession) -> bool {
    session.req_header().extensions.get::<Allowed>().is_some()
}

/// Adds the CORS headers to a response for a listed origin; nothing for
/// any other request.
pub fn decorate(session: &ServerSession, head: &mut ResponseHeader) {
    let Some(Allowed(origin)) = session.req_header().extensions.get::<Allowed>() else {
        return;
    };
    let _ = head.insert_header("access-control-allow-origin", origin.clone());
    let _ = head.append_header("vary", "Origin");
    let _ = head.insert_header("access-control-expose-headers", EXPOSED);
}

/// The headers of a listed origin's preflight answer, beyond [`decorate`]'s:
/// the methods, the request headers it asked for (each a header name; a
/// list that is not is answered without them, and the browser then refuses
/// the call), and how long to keep it.
pub fn preflight_headers(session: &ServerSession) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("access-control-allow-methods", METHODS.to_string()),
        ("access-control-max-age", MAX_AGE_SECONDS.to_string()),
    ];
    let requested = session
        .get_header("access-control-request-headers")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= MAX_REQUESTED_HEADERS_BYTES)
        .filter(|v| {
            v.split(',').map(str::trim).all(|name| {
                !name.is_empty() && http::HeaderName::from_bytes(name.as_bytes()).is_ok()
            })
        });
    if let Some(requested) = requested {
        out.push(("access-control-allow-headers", requested.to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_exact_and_wildcards_refused() {
        let c = Cors::parse(" http://localhost:5173, https://App.example.com/ ").unwrap();
        assert_eq!(
            c.origins,
            ["http://localhost:5173", "https://app.example.com"]
        );
        assert!(Cors::parse("").unwrap().is_off());
        for bad in [
            "*",
            "localhost:5173",
            "ftp://x",
            "https://*.example.com",
            "https://x/path",
        ] {
            assert_eq!(Cors::parse(bad).unwrap_err().0, bad, "{bad}");
        }
    }
}
