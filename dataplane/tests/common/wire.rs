//! HTTP/1.1 at the wire: raw TCP conversations and the responses in them.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

/// One parsed response off the wire.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Reads responses from `bytes` (a whole conversation, read to EOF).
pub fn parse_answers(mut bytes: &[u8]) -> Vec<Answer> {
    let mut out = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).to_string();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let rest = &bytes[end + 4..];
        let length = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let (body, consumed) = match length {
            Some(n) => (rest[..n.min(rest.len())].to_vec(), n.min(rest.len())),
            None => dechunk(rest),
        };
        out.push(Answer {
            status,
            headers,
            body,
        });
        bytes = &rest[consumed..];
    }
    out
}

fn dechunk(mut rest: &[u8]) -> (Vec<u8>, usize) {
    let total = rest.len();
    let mut body = Vec::new();
    while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            std::str::from_utf8(&rest[..line_end]).unwrap_or("0").trim(),
            16,
        )
        .unwrap_or(0);
        rest = &rest[line_end + 2..];
        if size == 0 {
            rest = &rest[rest.len().min(2)..];
            break;
        }
        body.extend_from_slice(&rest[..size.min(rest.len())]);
        rest = &rest[(size + 2).min(rest.len())..];
    }
    (body, total - rest.len())
}

/// Sends `raw`, optionally half-closes, and reads until the server closes
/// (or `wait` passes with nothing more). A reset is a panic: the server
/// stopped reading or dropped an answer.
pub fn converse(addr: SocketAddr, raw: &[u8], half_close: bool, wait: Duration) -> Vec<u8> {
    try_converse(addr, raw, half_close, wait).unwrap_or_else(|(e, got)| {
        panic!("connection reset instead of an answer: {e} (got {got:?})")
    })
}

/// [`converse`], returning a reset as an error with what was read before it.
pub fn try_converse(
    addr: SocketAddr,
    raw: &[u8],
    half_close: bool,
    wait: Duration,
) -> Result<Vec<u8>, (std::io::Error, Vec<u8>)> {
    let mut tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(wait)).unwrap();
    // A reset while writing shows again when reading.
    let _ = tcp.write_all(raw);
    if half_close {
        let _ = tcp.shutdown(Shutdown::Write);
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(got);
            }
            Err(e) => return Err((e, got)),
        }
    }
}
