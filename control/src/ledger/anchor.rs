//! The chain's head, anchored outside the database: `AEX_HOME/ledger.head`.
//!
//! A database edited without `ledger.key` cannot forge an event, but it can
//! lose its newest ones consistently (events, counters and balances rolled
//! back together) or be emptied, and what is left is a valid chain. The
//! anchor says where the chain reached: written after every commit and
//! before the commit is acknowledged, HMAC'd with a key derived from
//! `ledger.key`, so a database behind it, or with a different event at the
//! anchored position, is named at the next start and by `aexctl audit`.
//!
//! Format: two 128-byte slots written alternately with one `pwrite` each;
//! the valid slot with the highest counter is the head. A slot that does
//! not verify beside a valid one is named, not skipped (issue #31): zeroing
//! the newest slot would otherwise leave the older one, and with it the
//! removal of the last commit, unseen. Only an OS crash can tear a write
//! (nothing here survives one without loss: the WAL's tail may go with it),
//! so the operator is told either way.
//!
//! Slot: magic `AEXHEAD1` (8), counter u64 BE (8), seq i64 BE
//! (8), head hash (32 raw bytes, zeros for an empty chain), written at ms
//! i64 BE (8), zeros to 96, HMAC-SHA256 of bytes 0..96 (32). No fsync per
//! write: like the WAL (synchronous=NORMAL) it is in the page cache, which a
//! `kill -9` does not lose; an OS crash may lose both together.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const MAGIC: &[u8; 8] = b"AEXHEAD1";
const SLOT: usize = 128;
const SIGNED: usize = 96;

/// Where the chain reached when the anchor was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: i64,
    /// The event's hash (lower-case hex), or `genesis` for an empty chain.
    pub hash: String,
    pub written_at_ms: i64,
}

/// What the anchor file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnchorState {
    Present(Anchor),
    Missing,
    /// Neither slot carries a valid HMAC: written without `ledger.key`.
    Invalid(String),
    /// One slot verifies and the file holds another that does not (zeroed,
    /// edited, or torn by an OS crash): the valid slot may be the older.
    Damaged {
        newest: Anchor,
        why: String,
    },
}

impl AnchorState {
    /// The newest valid slot's anchor, damaged file or not.
    pub fn anchor(&self) -> Option<&Anchor> {
        match self {
            AnchorState::Present(a) | AnchorState::Damaged { newest: a, .. } => Some(a),
            AnchorState::Missing | AnchorState::Invalid(_) => None,
        }
    }
}

fn head_key(ledger_key: &[u8]) -> Hmac<Sha256> {
    let mut derive =
        Hmac::<Sha256>::new_from_slice(ledger_key).expect("HMAC accepts any key length");
    derive.update(b"aex/ledger.head/v1");
    let derived = derive.finalize().into_bytes();
    Hmac::<Sha256>::new_from_slice(&derived).expect("HMAC accepts any key length")
}

fn hash_bytes(hash: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    if hash.len() == 64 {
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hash[2 * i..2 * i + 2], 16).unwrap_or(0);
        }
    }
    out
}

fn encode(key: &Hmac<Sha256>, counter: u64, a: &Anchor) -> [u8; SLOT] {
    let mut slot = [0u8; SLOT];
    slot[0..8].copy_from_slice(MAGIC);
    slot[8..16].copy_from_slice(&counter.to_be_bytes());
    slot[16..24].copy_from_slice(&a.seq.to_be_bytes());
    slot[24..56].copy_from_slice(&hash_bytes(&a.hash));
    slot[56..64].copy_from_slice(&a.written_at_ms.to_be_bytes());
    let mut mac = key.clone();
    mac.update(&slot[..SIGNED]);
    slot[SIGNED..].copy_from_slice(&mac.finalize().into_bytes());
    slot
}

/// The slot's counter and anchor, if its HMAC verifies.
fn decode(key: &Hmac<Sha256>, slot: &[u8]) -> Option<(u64, Anchor)> {
    if slot.len() != SLOT || &slot[0..8] != MAGIC {
        return None;
    }
    let mut mac = key.clone();
    mac.update(&slot[..SIGNED]);
    mac.verify_slice(&slot[SIGNED..]).ok()?;
    let int = |range: std::ops::Range<usize>| {
        u64::from_be_bytes(slot[range].try_into().expect("8 bytes"))
    };
    let seq = int(16..24) as i64;
    let hash = if seq == 0 {
        aex_core::chain::GENESIS.to_string()
    } else {
        aex_core::secrets::hex(&slot[24..56])
    };
    Some((
        int(8..16),
        Anchor {
            seq,
            hash,
            written_at_ms: int(56..64) as i64,
        },
    ))
}

/// The valid slot with the highest counter, if any.
fn newest_slot(key: &Hmac<Sha256>, bytes: &[u8]) -> Option<(u64, Anchor)> {
    bytes
        .chunks(SLOT)
        .take(2)
        .filter_map(|slot| decode(key, slot))
        .max_by_key(|(counter, _)| *counter)
}

/// What is wrong with the file beside its valid slots, if anything: a
/// length no writer leaves (one slot, or two), or a slot that does not
/// verify. The second slot is absent until the second write.
fn damage(key: &Hmac<Sha256>, bytes: &[u8]) -> Option<String> {
    if bytes.len() != SLOT && bytes.len() != 2 * SLOT {
        return Some(format!(
            "it is {} bytes long; a writer leaves {SLOT} or {}",
            bytes.len(),
            2 * SLOT
        ));
    }
    let bad: Vec<usize> = bytes
        .chunks(SLOT)
        .enumerate()
        .filter(|(_, slot)| decode(key, slot).is_none())
        .map(|(i, _)| i)
        .collect();
    (!bad.is_empty()).then(|| {
        format!(
            "slot {} does not verify (zeroed or edited, or torn by an OS crash): the slot left may \
             be the older, and the last commit may have been removed with the newer",
            bad[0]
        )
    })
}

/// Reads the anchor file (without opening it for writing).
pub fn read(path: &Path, ledger_key: &[u8]) -> AnchorState {
    let key = head_key(ledger_key);
    // A read racing a write can see a slot half written: a damaged file is
    // read again a few times before it is believed.
    let mut attempts = 0;
    loop {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return AnchorState::Missing,
            Err(e) => return AnchorState::Invalid(format!("cannot read {}: {e}", path.display())),
        };
        let Some((_, newest)) = newest_slot(&key, &bytes) else {
            return AnchorState::Invalid(format!(
                "{} is not an anchor written with this ledger.key",
                path.display()
            ));
        };
        match damage(&key, &bytes) {
            None => return AnchorState::Present(newest),
            Some(why) if attempts >= 3 => {
                return AnchorState::Damaged {
                    newest,
                    why: format!("{}: {why}", path.display()),
                };
            }
            Some(_) => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}

/// The anchor file, open for writing, shared by every writer of the chain.
pub struct AnchorFile {
    path: PathBuf,
    key: Hmac<Sha256>,
    file: File,
    /// (next counter, highest seq written): writers anchor after their
    /// commits, not under the database's lock, so an older head must never
    /// overwrite a newer one.
    state: Mutex<(u64, i64)>,
}

impl AnchorFile {
    pub fn open(path: &Path, ledger_key: &[u8]) -> std::io::Result<Self> {
        let key = head_key(ledger_key);
        // Go on counting from the file, so the next write lands in the
        // other slot than the newest valid one.
        let counter = std::fs::read(path)
            .ok()
            .and_then(|bytes| newest_slot(&key, &bytes))
            .map_or(0, |(c, _)| c + 1);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            key,
            file,
            state: Mutex::new((counter, i64::MIN)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `seq`/`hash` as the chain's head (if it is newer than the
    /// last one written). About 3 µs: one HMAC and one 128-byte pwrite.
    pub fn write(&self, seq: i64, hash: &str) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if seq <= state.1 {
            return Ok(());
        }
        let anchor = Anchor {
            seq,
            hash: hash.to_string(),
            written_at_ms: crate::clock::now_ms(),
        };
        let counter = state.0;
        let slot = encode(&self.key, counter, &anchor);
        self.file.write_all_at(&slot, (counter % 2) * SLOT as u64)?;
        *state = (counter + 1, seq);
        Ok(())
    }

    /// Writes the head even if it is not newer: after a start that found
    /// the anchor ahead of the database (the mismatch is in the chain).
    pub fn reset(&self, seq: i64, hash: &str) -> std::io::Result<()> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = i64::MIN;
        self.write(seq, hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn writes_read_back_and_only_move_forward() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.head");
        let key = b"k".repeat(32);
        assert_eq!(read(&path, &key), AnchorState::Missing);
        let a = AnchorFile::open(&path, &key).unwrap();
        a.write(0, "genesis").unwrap();
        a.write(7, HASH).unwrap();
        a.write(5, "ff".repeat(32).as_str()).unwrap();
        let AnchorState::Present(got) = read(&path, &key) else {
            panic!("no anchor")
        };
        assert_eq!((got.seq, got.hash.as_str()), (7, HASH));
        // Reopened, it goes on counting from the file.
        let again = AnchorFile::open(&path, &key).unwrap();
        again.write(9, HASH).unwrap();
        let AnchorState::Present(got) = read(&path, &key) else {
            panic!("no anchor")
        };
        assert_eq!(got.seq, 9);
        assert!(matches!(
            read(&path, b"another key"),
            AnchorState::Invalid(_)
        ));
    }

    #[test]
    fn a_slot_that_does_not_verify_is_named_beside_the_valid_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.head");
        let key = b"k".repeat(32);
        let a = AnchorFile::open(&path, &key).unwrap();
        a.write(3, HASH).unwrap();
        a.write(4, HASH).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        // One write: one slot, nothing wrong.
        let one = dir.path().join("one.head");
        AnchorFile::open(&one, &key)
            .unwrap()
            .write(1, HASH)
            .unwrap();
        assert!(matches!(read(&one, &key), AnchorState::Present(_)));
        // The newer slot (counter 1) zeroed: the older is read, and named.
        let mut zeroed = bytes.clone();
        zeroed[SLOT..].fill(0);
        std::fs::write(&path, &zeroed).unwrap();
        let AnchorState::Damaged { newest, why } = read(&path, &key) else {
            panic!("a zeroed slot passed")
        };
        assert_eq!(newest.seq, 3);
        assert!(why.contains("slot 1 does not verify"), "{why}");
        // Cut short, or one bit flipped: named the same way.
        std::fs::write(&path, &bytes[..SLOT + 40]).unwrap();
        assert!(matches!(read(&path, &key), AnchorState::Damaged { .. }));
        bytes[SLOT + 20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(read(&path, &key), AnchorState::Damaged { .. }));
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(read(&path, &key), AnchorState::Invalid(_)));
    }
}
