//! `AEX_HOME` (default `~/.aex`): the one place AEX writes to.
//!
//! ```text
//! config/models.yaml   model routing            logs/   daemon logs
//! aex.db               SQLite ledger            run/    pid files
//! .env                 provider keys (0600)     admin.token, dataplane.token (0600)
//! ledger.key           HMAC key of the event chain (0600)
//! ```

use crate::config::DEFAULT_MODELS_YAML;
use crate::secrets::{new_credential, random_bytes};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("cannot find a home directory; set AEX_HOME")]
    NoHome,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is missing; run `aexctl init` (AEX_HOME={home})")]
    Missing { path: PathBuf, home: PathBuf },
    #[error("{path} is empty or malformed; run `aexctl init --force` to recreate the credentials")]
    Malformed { path: PathBuf },
}

/// What `init` did, for the CLI to report.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InitReport {
    pub created: Vec<PathBuf>,
    pub kept: Vec<PathBuf>,
    pub replaced: Vec<PathBuf>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
    move |source| HomeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Home {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `explicit` (a `--home` flag) wins, then `AEX_HOME`, then `~/.aex`.
    pub fn resolve(explicit: Option<PathBuf>) -> Result<Self, HomeError> {
        if let Some(p) = explicit {
            return Ok(Self::new(p));
        }
        if let Some(p) = std::env::var_os("AEX_HOME").filter(|p| !p.is_empty()) {
            return Ok(Self::new(p));
        }
        let home = std::env::var_os("HOME")
            .filter(|p| !p.is_empty())
            .ok_or(HomeError::NoHome)?;
        Ok(Self::new(PathBuf::from(home).join(".aex")))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config_dir(&self) -> PathBuf {
        self.root.join("config")
    }
    pub fn models_yaml(&self) -> PathBuf {
        self.config_dir().join("models.yaml")
    }
    pub fn db_path(&self) -> PathBuf {
        self.root.join("aex.db")
    }
    pub fn env_file(&self) -> PathBuf {
        self.root.join(".env")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn admin_token_path(&self) -> PathBuf {
        self.root.join("admin.token")
    }
    pub fn dataplane_token_path(&self) -> PathBuf {
        self.root.join("dataplane.token")
    }
    pub fn ledger_key_path(&self) -> PathBuf {
        self.root.join("ledger.key")
    }
    /// The chain's head anchor for the database at `db` (see
    /// `ledger::anchor`): next to the key, never next to the database.
    pub fn ledger_head_path(&self, db: &Path) -> PathBuf {
        if db == self.db_path() {
            return self.root.join("ledger.head");
        }
        use sha2::Digest;
        let digest = sha2::Sha256::digest(db.to_string_lossy().as_bytes());
        self.root.join(format!(
            "ledger-{}.head",
            &crate::secrets::hex(&digest)[..16]
        ))
    }

    /// Creates what is missing. Never overwrites without `force`; even then
    /// the ledger key and `.env` are kept, because replacing the key would
    /// make every existing event fail verification and `.env` holds the
    /// user's provider keys.
    pub fn init(&self, force: bool) -> Result<InitReport, HomeError> {
        let mut report = InitReport::default();
        for dir in [
            &self.root,
            &self.config_dir(),
            &self.logs_dir(),
            &self.run_dir(),
        ] {
            fs::create_dir_all(dir).map_err(io(dir))?;
        }
        // The directory holds credentials; keep other users out.
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .map_err(io(&self.root))?;

        let mut write = |path: PathBuf, content: &[u8], mode: u32, replaceable: bool| {
            let exists = path.exists();
            if exists && !(force && replaceable) {
                report.kept.push(path);
                return Ok(());
            }
            write_private(&path, content, mode)?;
            if exists {
                report.replaced.push(path);
            } else {
                report.created.push(path);
            }
            Ok::<_, HomeError>(())
        };
        write(
            self.models_yaml(),
            DEFAULT_MODELS_YAML.as_bytes(),
            0o644,
            true,
        )?;
        write(
            self.env_file(),
            b"# Provider keys for AEX: NAME_API_KEY=value, one per line.\n# LOCAL_API_KEY=dummy\n",
            0o600,
            false,
        )?;
        write(
            self.admin_token_path(),
            format!("{}\n", new_credential("adm")).as_bytes(),
            0o600,
            true,
        )?;
        write(
            self.dataplane_token_path(),
            format!("{}\n", new_credential("dp")).as_bytes(),
            0o600,
            true,
        )?;
        let key = crate::secrets::hex(&random_bytes::<32>());
        write(
            self.ledger_key_path(),
            format!("{key}\n").as_bytes(),
            0o600,
            false,
        )?;
        Ok(report)
    }

    pub fn read_admin_token(&self) -> Result<String, HomeError> {
        self.read_secret(&self.admin_token_path())
    }
    pub fn read_dataplane_token(&self) -> Result<String, HomeError> {
        self.read_secret(&self.dataplane_token_path())
    }
    pub fn read_ledger_key(&self) -> Result<Vec<u8>, HomeError> {
        let path = self.ledger_key_path();
        let text = self.read_secret(&path)?;
        decode_hex(&text).ok_or(HomeError::Malformed { path })
    }

    fn read_secret(&self, path: &Path) -> Result<String, HomeError> {
        let text = fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                HomeError::Missing {
                    path: path.to_path_buf(),
                    home: self.root.clone(),
                }
            } else {
                io(path)(e)
            }
        })?;
        let secret = text.trim();
        if secret.is_empty() || secret.contains(char::is_whitespace) {
            return Err(HomeError::Malformed {
                path: path.to_path_buf(),
            });
        }
        Ok(secret.to_string())
    }
}

/// Makes every file the process creates from now on private to its user
/// (0600, directories 0700): the ledger and its WAL and shared-memory files,
/// logs, pid and address files. SQLite creates its files with the process's
/// umask, so this is the one place that covers them all. Call it first in
/// `main`, before anything creates a file.
pub fn create_files_private() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Writes via a temporary file and rename, so a crash never leaves a
/// half-written credential, and with the final mode from the first byte.
fn write_private(path: &Path, content: &[u8], mode: u32) -> Result<(), HomeError> {
    let tmp = path.with_extension("tmp-aex");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    // The umask may have narrowed `mode`; the file gets exactly `mode`.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io(&tmp))?;
    f.write_all(content).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() < 32 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `NAME=value` lines from `AEX_HOME/.env`; the process environment wins.
pub fn read_env_file(path: &Path) -> std::collections::HashMap<String, String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Default::default();
    };
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let line = line.strip_prefix("export ").unwrap_or(line);
            if line.starts_with('#') {
                return None;
            }
            let (k, v) = line.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file() {
        let dir = std::env::temp_dir().join(format!("aex-env-{}", std::process::id()));
        std::fs::write(
            &dir,
            "# c\nLOCAL_API_KEY=dummy\nexport GROQ_API_KEY=\"g k\"\nBAD\n",
        )
        .unwrap();
        let env = read_env_file(&dir);
        assert_eq!(env["LOCAL_API_KEY"], "dummy");
        assert_eq!(env["GROQ_API_KEY"], "g k");
        assert_eq!(env.len(), 2);
        let _ = std::fs::remove_file(dir);
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_creates_private_files_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().join("h"));
        let first = home.init(false).unwrap();
        assert_eq!(first.created.len(), 5);
        for p in [
            home.admin_token_path(),
            home.dataplane_token_path(),
            home.ledger_key_path(),
            home.env_file(),
        ] {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
        assert_eq!(mode(home.root()), 0o700);
        let admin = home.read_admin_token().unwrap();
        assert!(admin.starts_with("aexadm_"));
        let key = home.read_ledger_key().unwrap();
        assert_eq!(key.len(), 32);

        fs::write(home.models_yaml(), "edited").unwrap();
        let second = home.init(false).unwrap();
        assert!(second.created.is_empty());
        assert_eq!(second.kept.len(), 5);
        assert_eq!(fs::read_to_string(home.models_yaml()).unwrap(), "edited");
        assert_eq!(home.read_admin_token().unwrap(), admin);

        let forced = home.init(true).unwrap();
        assert_eq!(forced.replaced.len(), 3);
        assert_eq!(
            home.read_ledger_key().unwrap(),
            key,
            "the ledger key survives --force"
        );
        assert_ne!(home.read_admin_token().unwrap(), admin);
    }

    #[test]
    fn missing_credentials_say_how_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let e = Home::new(dir.path()).read_admin_token().unwrap_err();
        assert!(e.to_string().contains("run `aexctl init`"), "{e}");
    }
}
