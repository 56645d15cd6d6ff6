//! Compressed request bodies (issue #33): `Content-Encoding: gzip` or
//! `deflate`, as some SDKs and agent frameworks send large prompts. The
//! decoded body is bounded by the same limit as a plain one, so a
//! decompression bomb is a 413 after reading at most the limit plus one
//! byte of its output, never a buffer of what it claims to hold. What AEX
//! cannot decode is a 415 naming the coding; a body that is not what its
//! header says is a 400. The provider gets the decoded body.

use std::io::Read;

/// A content coding AEX decodes (RFC 9110 §8.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    /// The zlib format (RFC 1950), as HTTP defines `deflate`; raw deflate
    /// (RFC 1951), which some clients send under that name, is read too.
    Deflate,
}

/// Why a body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A coding AEX does not decode (`br`, `zstd`, `compress`…): its name.
    Unsupported(String),
    /// The decoded body would pass the limit.
    TooLarge,
    /// The body is not valid in the coding its header names.
    Corrupt { coding: &'static str, why: String },
}

/// The codings of a `Content-Encoding` value, in the order they were
/// applied (`identity` dropped). More than two is refused as unsupported:
/// no client stacks them, and each is another pass over the body.
pub fn codings(header: &str) -> Result<Vec<Coding>, DecodeError> {
    let mut out = Vec::new();
    for name in header.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match name.to_ascii_lowercase().as_str() {
            "identity" => {}
            "gzip" | "x-gzip" => out.push(Coding::Gzip),
            "deflate" => out.push(Coding::Deflate),
            _ => return Err(DecodeError::Unsupported(name.chars().take(40).collect())),
        }
    }
    if out.len() > 2 {
        return Err(DecodeError::Unsupported(header.chars().take(40).collect()));
    }
    Ok(out)
}

/// `body` with `codings` undone (the last applied first), at most `limit`
/// bytes of it.
pub fn decode(mut body: Vec<u8>, codings: &[Coding], limit: usize) -> Result<Vec<u8>, DecodeError> {
    for coding in codings.iter().rev() {
        body = match coding {
            Coding::Gzip => {
                read_bounded(flate2::read::MultiGzDecoder::new(&body[..]), limit, "gzip")?
            }
            Coding::Deflate => {
                match read_bounded(flate2::read::ZlibDecoder::new(&body[..]), limit, "deflate") {
                    Err(DecodeError::Corrupt { .. }) => read_bounded(
                        flate2::read::DeflateDecoder::new(&body[..]),
                        limit,
                        "deflate",
                    )?,
                    other => other?,
                }
            }
        };
    }
    Ok(body)
}

fn read_bounded(
    reader: impl Read,
    limit: usize,
    coding: &'static str,
) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    // One byte past the limit tells a body at the limit from one over it.
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Corrupt {
            coding,
            why: e.to_string(),
        })?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn codings_are_read_in_order_and_unknown_ones_named() {
        assert_eq!(codings(""), Ok(vec![]));
        assert_eq!(codings("identity"), Ok(vec![]));
        assert_eq!(codings("GZIP"), Ok(vec![Coding::Gzip]));
        assert_eq!(codings("x-gzip"), Ok(vec![Coding::Gzip]));
        assert_eq!(
            codings("deflate, gzip"),
            Ok(vec![Coding::Deflate, Coding::Gzip])
        );
        assert_eq!(codings("br"), Err(DecodeError::Unsupported("br".into())));
        assert!(matches!(
            codings("gzip, gzip, gzip"),
            Err(DecodeError::Unsupported(_))
        ));
    }

    #[test]
    fn gzip_and_both_deflates_decode_within_the_limit() {
        let body = br#"{"model":"m","messages":[]}"#.repeat(100);
        assert_eq!(
            decode(gzip(&body), &[Coding::Gzip], body.len()),
            Ok(body.clone())
        );
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&body).unwrap();
        assert_eq!(
            decode(z.finish().unwrap(), &[Coding::Deflate], body.len()),
            Ok(body.clone())
        );
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        raw.write_all(&body).unwrap();
        assert_eq!(
            decode(raw.finish().unwrap(), &[Coding::Deflate], body.len()),
            Ok(body.clone())
        );
        // Stacked: deflate applied first, then gzip.
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&body).unwrap();
        let stacked = gzip(&z.finish().unwrap());
        assert_eq!(
            decode(stacked, &[Coding::Deflate, Coding::Gzip], body.len()),
            Ok(body.clone())
        );
        assert_eq!(decode(body.clone(), &[], 1), Ok(body));
    }

    #[test]
    fn a_bomb_stops_at_the_limit_and_garbage_is_named() {
        let bomb = gzip(&vec![0; 10 << 20]);
        assert!(bomb.len() < 100 << 10, "{}", bomb.len());
        assert_eq!(
            decode(bomb, &[Coding::Gzip], 8 << 20),
            Err(DecodeError::TooLarge)
        );
        assert!(matches!(
            decode(b"not gzip".to_vec(), &[Coding::Gzip], 1 << 20),
            Err(DecodeError::Corrupt { coding: "gzip", .. })
        ));
        assert!(matches!(
            decode(b"\xff\xff\xff".to_vec(), &[Coding::Deflate], 1 << 20),
            Err(DecodeError::Corrupt {
                coding: "deflate",
                ..
            })
        ));
    }
}
