//! TLS on the gRPC API (rustls), as every client of it sets it up: an
//! `https://` control plane is verified against the CA file given (no
//! system roots: a deployment's control plane has its own CA), and under
//! mutual TLS the client presents its certificate and key. The files are
//! PEM, so they can come straight from Kubernetes Secrets.

use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A client's TLS files (`--tls-ca`, `--tls-cert`, `--tls-key`).
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

impl ClientTls {
    /// `endpoint` for `url`, with TLS when it is `https://`.
    pub fn apply(&self, endpoint: Endpoint, url: &str) -> Result<Endpoint, String> {
        let https = url.starts_with("https://");
        if !https {
            if self.ca.is_some() || self.cert.is_some() {
                return Err(format!(
                    "TLS files were given but the control plane's address {url} is http://; use https://"
                ));
            }
            return Ok(endpoint);
        }
        let Some(ca) = &self.ca else {
            return Err(format!(
                "{url} is https:// but no CA was given: pass --tls-ca FILE (the PEM of the CA that signed the control plane's certificate)"
            ));
        };
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("CA certificate", ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read("client certificate", cert)?,
                    read("client key", key)?,
                ));
            }
            (None, None) => {}
            _ => return Err("--tls-cert and --tls-key go together (mutual TLS)".into()),
        }
        endpoint
            .tls_config(config)
            .map_err(|e| format!("TLS for {url}: {e}"))
    }
}
