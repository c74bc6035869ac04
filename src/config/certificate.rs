//! TLS certificates as the configuration names them: a PEM chain and its private key, read,
//! parsed and checked at load (and at every reload) so that a bad file is an error with its
//! key and line, never a failed handshake later. It owns what a certificate covers (its DNS
//! names, wildcards included) and until when; choosing one per handshake is `proxy::tls`'s.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// A certificate chain with its key, loaded and checked.
#[derive(Debug, Clone)]
pub struct Certificate {
    pub chain_file: PathBuf,
    pub key_file: PathBuf,
    pub key: Arc<CertifiedKey>,
    /// Lowercased names it is chosen for; `*.example.org` covers one label (RFC 6125 §6.4.3).
    pub names: Vec<String>,
    /// Every DNS name the certificate itself covers (its subjectAltName).
    pub covers: Vec<String>,
    pub not_after: SystemTime,
    /// The client's choice when no certificate's names match (or no name was sent).
    pub default: bool,
}

/// What is wrong with a certificate, and which of its two files says so.
#[derive(Debug, PartialEq, Eq)]
pub enum CertificateError {
    Chain(String),
    Key(String),
}

/// Reads and checks `chain_file` and `key_file` at `now`: both readable PEM, the key the
/// chain's first certificate's, the certificate valid now, with at least one DNS name.
pub fn load(
    chain_file: &Path,
    key_file: &Path,
    now: SystemTime,
) -> Result<Certificate, CertificateError> {
    use CertificateError::{Chain, Key};
    let chain_pem = std::fs::read(chain_file)
        .map_err(|e| Chain(format!("cannot read {}: {e}", chain_file.display())))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            Chain(format!(
                "{}: not PEM certificates: {e}",
                chain_file.display()
            ))
        })?;
    let Some(leaf) = chain.first() else {
        return Err(Chain(format!(
            "{}: holds no certificate (-----BEGIN CERTIFICATE-----)",
            chain_file.display()
        )));
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| {
        Chain(format!(
            "{}: not an X.509 certificate: {e}",
            chain_file.display()
        ))
    })?;
    let validity = parsed.validity();
    let at = |t: &x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    let (not_before, not_after) = (at(&validity.not_before), at(&validity.not_after));
    if not_after < now {
        return Err(Chain(format!(
            "{}: the certificate expired on {}",
            chain_file.display(),
            httpdate::fmt_http_date(not_after)
        )));
    }
    if not_before > now {
        return Err(Chain(format!(
            "{}: the certificate is not valid before {}",
            chain_file.display(),
            httpdate::fmt_http_date(not_before)
        )));
    }
    let mut covers = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                covers.push(dns.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    if covers.is_empty() {
        return Err(Chain(format!(
            "{}: the certificate names no DNS name (subjectAltName), so no client would accept it",
            chain_file.display()
        )));
    }

    let key_pem = std::fs::read(key_file)
        .map_err(|e| Key(format!("cannot read {}: {e}", key_file.display())))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| Key(format!("{}: no PEM private key: {e}", key_file.display())))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => Key(format!(
            "{} is not the key of the certificate in {}",
            key_file.display(),
            chain_file.display()
        )),
        other => Key(format!(
            "{}: unusable private key: {other}",
            key_file.display()
        )),
    })?;
    Ok(Certificate {
        chain_file: chain_file.to_path_buf(),
        key_file: key_file.to_path_buf(),
        key: Arc::new(certified),
        names: covers.clone(),
        covers,
        not_after,
        default: false,
    })
}

/// The certificates in the PEM file `path`, each parsed (an authority a TLS client verifies
/// against): DER, in file order.
pub fn load_authorities(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: holds no certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    for cert in &certs {
        x509_parser::parse_x509_certificate(cert)
            .map_err(|e| format!("{}: a certificate does not parse: {e}", path.display()))?;
    }
    Ok(certs.into_iter().map(|c| c.to_vec()).collect())
}

/// Whether a certificate name (`wiki.example` or `*.wiki.example`) covers `host`, both
/// lowercase: a wildcard stands for exactly one leftmost label (RFC 6125 §6.4.3).
pub fn covers(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => pattern == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_covers_one_label() {
        assert!(covers("*.wiki.test", "en.wiki.test"));
        assert!(!covers("*.wiki.test", "wiki.test"));
        assert!(!covers("*.wiki.test", "a.en.wiki.test"));
        assert!(covers("wiki.test", "wiki.test"));
        assert!(!covers("wiki.test", "en.wiki.test"));
    }
}
