//! Who may call the admin interfaces: the `Admin` gRPC service and the pack
//! page on the admin HTTP port.
//!
//! - With `--admin-token-file`, a caller must present one of the file's
//!   bearer tokens (`authorization: Bearer TOKEN`). The file holds one token
//!   a line; blank lines and lines starting with `#` are ignored. It is
//!   re-read when it changes (its modification time, size or inode, checked
//!   at most once a second on an admin call), so tokens rotate without a
//!   restart. A file that becomes unreadable or empty keeps the last good
//!   tokens and logs a warning: a half-written rotation must not lock the
//!   operator out, nor open the service.
//! - Without it, only loopback peers are served: a bare `packmeter serve`
//!   and the CLI on the same machine work as before, and nothing else can
//!   reach the admin calls.
//!
//! Tokens are compared in constant time ([`subtle`]) and never logged; each
//! refusal is counted in `packmeter_admin_auth_failures_total{interface,
//! reason}`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use subtle::ConstantTimeEq;

use crate::{
    file_stamp::{stamp, Stamp},
    metrics::Metrics,
};

/// How often the token file's metadata is looked at, at most.
const RECHECK: Duration = Duration::from_secs(1);

/// Why a caller was refused: the `reason` label of the failure metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `authorization` header or metadata.
    Missing,
    /// Not `Bearer <token>`.
    Malformed,
    /// A bearer token that is not in the file.
    Wrong,
    /// No token file, and the peer is not a loopback address (or unknown).
    NotLoopback,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::Wrong => "wrong",
            Refusal::NotLoopback => "not_loopback",
        }
    }

    /// What the caller is told: how to authenticate, never the token.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Missing => {
                "admin calls need `authorization: Bearer <token>` with a token from the \
                 server's --admin-token-file"
            }
            Refusal::Malformed => {
                "the authorization header must be `Bearer <token>` with a token from the \
                 server's --admin-token-file"
            }
            Refusal::Wrong => "the bearer token is not one of the server's admin tokens",
            Refusal::NotLoopback => {
                "admin calls are served only to loopback peers when no token is configured; \
                 start the server with --admin-token-file (PACKMETER_ADMIN_TOKEN_FILE) and \
                 send `authorization: Bearer <token>` (the CLI reads --token-file or \
                 PACKMETER_ADMIN_TOKEN)"
            }
        }
    }
}

/// Reads a token file: one token a line, blank lines and `#` comments
/// ignored, surrounding whitespace trimmed. An empty list is an error.
pub fn read_tokens(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let tokens: Vec<Vec<u8>> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.as_bytes().to_vec())
        .collect();
    if tokens.is_empty() {
        return Err(format!(
            "{} holds no token; write one bearer token a line",
            path.display()
        ));
    }
    if tokens.iter().any(|t| t.iter().any(u8::is_ascii_whitespace)) {
        return Err(format!(
            "{} has a line with whitespace inside it; a token is one word a line",
            path.display()
        ));
    }
    Ok(tokens)
}

struct Loaded {
    tokens: Arc<Vec<Vec<u8>>>,
    stamp: Option<Stamp>,
    checked: Instant,
}

/// The tokens of `--admin-token-file`, re-read when the file changes.
pub struct TokenFile {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl TokenFile {
    /// Reads the file once; an unreadable or empty file is an error.
    pub fn open(path: &Path) -> Result<TokenFile, String> {
        let stamp = stamp(path);
        let tokens = read_tokens(path)?;
        Ok(TokenFile {
            path: path.to_path_buf(),
            loaded: Mutex::new(Loaded {
                tokens: Arc::new(tokens),
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// The current tokens, re-reading the file if it changed.
    fn tokens(&self, metrics: &Metrics) -> Arc<Vec<Vec<u8>>> {
        let mut l = self.loaded.lock();
        if l.checked.elapsed() < RECHECK {
            return l.tokens.clone();
        }
        l.checked = Instant::now();
        let now = stamp(&self.path);
        if now.is_some() && now == l.stamp {
            return l.tokens.clone();
        }
        match read_tokens(&self.path) {
            Ok(tokens) => {
                tracing::info!(path = %self.path.display(), tokens = tokens.len(), "admin token file re-read");
                l.tokens = Arc::new(tokens);
                l.stamp = now;
                metrics.admin_token_reloaded("ok");
            }
            Err(e) => {
                // Keep the last good tokens; say so once per change.
                if now != l.stamp {
                    tracing::warn!(error = %e, "admin token file unusable; keeping the tokens read before");
                    metrics.admin_token_reloaded("error");
                }
                l.stamp = now;
            }
        }
        l.tokens.clone()
    }

    /// Whether `presented` is one of the tokens, in constant time for each
    /// (every token is compared, whether or not an earlier one matched).
    fn accepts(&self, presented: &[u8], metrics: &Metrics) -> bool {
        let tokens = self.tokens(metrics);
        let mut ok = subtle::Choice::from(0u8);
        for t in tokens.iter() {
            ok |= t.as_slice().ct_eq(presented);
        }
        ok.into()
    }
}

/// The admin access policy, shared by the gRPC and HTTP admin interfaces.
#[derive(Clone)]
pub struct AdminAuth {
    tokens: Option<Arc<TokenFile>>,
    metrics: Arc<Metrics>,
}

impl AdminAuth {
    pub fn new(tokens: Option<Arc<TokenFile>>, metrics: Arc<Metrics>) -> AdminAuth {
        AdminAuth { tokens, metrics }
    }

    /// Whether a token file is configured.
    pub fn has_tokens(&self) -> bool {
        self.tokens.is_some()
    }

    /// Checks one call: its `authorization` value and its peer address.
    /// `interface` labels the failure metric (`grpc` or `http`).
    pub fn check(
        &self,
        interface: &'static str,
        authorization: Option<&[u8]>,
        peer: Option<SocketAddr>,
    ) -> Result<(), Refusal> {
        let r = self.decide(authorization, peer);
        if let Err(refusal) = r {
            self.metrics.admin_auth_failed(interface, refusal.reason());
        }
        r
    }

    fn decide(
        &self,
        authorization: Option<&[u8]>,
        peer: Option<SocketAddr>,
    ) -> Result<(), Refusal> {
        let Some(file) = &self.tokens else {
            return match peer {
                Some(p) if p.ip().is_loopback() || is_mapped_loopback(p) => Ok(()),
                _ => Err(Refusal::NotLoopback),
            };
        };
        let value = authorization.ok_or(Refusal::Missing)?;
        let token = bearer(value).ok_or(Refusal::Malformed)?;
        if file.accepts(token, &self.metrics) {
            Ok(())
        } else {
            Err(Refusal::Wrong)
        }
    }
}

/// `::ffff:127.0.0.1` from a dual-stack listener is loopback too.
fn is_mapped_loopback(p: SocketAddr) -> bool {
    match p.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        std::net::IpAddr::V4(_) => false,
    }
}

/// The token of `Bearer <token>` (the scheme is case-insensitive, RFC 7235).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The tonic interceptor on the `Admin` service: the one place gRPC admin
/// calls are checked.
#[derive(Clone)]
pub struct AdminInterceptor(pub AdminAuth);

impl tonic::service::Interceptor for AdminInterceptor {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let authorization = req.metadata().get("authorization").map(|v| v.as_bytes());
        match self.0.check("grpc", authorization, req.remote_addr()) {
            Ok(()) => Ok(req),
            Err(refusal) => Err(tonic::Status::unauthenticated(refusal.message())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn tokens_skip_blank_lines_and_comments_and_an_empty_file_is_refused() {
        let (_d, p) = file("# admin\n\n  alpha  \nbeta\n#gamma\n");
        assert_eq!(
            read_tokens(&p).unwrap(),
            vec![b"alpha".to_vec(), b"beta".to_vec()]
        );
        let (_d, p) = file("# nothing\n\n");
        assert!(read_tokens(&p).unwrap_err().contains("no token"));
        let (_d, p) = file("two words\n");
        assert!(read_tokens(&p).is_err());
    }

    #[test]
    fn bearer_values_are_parsed_strictly() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bear"), None);
    }

    #[test]
    fn the_policy_checks_tokens_or_the_peer() {
        let metrics = Arc::new(Metrics::new());
        let local: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let remote: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let open = AdminAuth::new(None, metrics.clone());
        assert_eq!(open.check("grpc", None, Some(local)), Ok(()));
        assert_eq!(
            open.check("grpc", None, Some("[::ffff:127.0.0.1]:1".parse().unwrap())),
            Ok(())
        );
        assert_eq!(
            open.check("grpc", None, Some(remote)),
            Err(Refusal::NotLoopback)
        );
        assert_eq!(open.check("grpc", None, None), Err(Refusal::NotLoopback));
        // A token does not open the loopback-only mode to other peers.
        assert_eq!(
            open.check("grpc", Some(b"Bearer x"), Some(remote)),
            Err(Refusal::NotLoopback)
        );

        let (_d, p) = file("s3cret\nother\n");
        let auth = AdminAuth::new(Some(Arc::new(TokenFile::open(&p).unwrap())), metrics);
        assert_eq!(
            auth.check("grpc", Some(b"Bearer other"), Some(remote)),
            Ok(())
        );
        assert_eq!(auth.check("grpc", None, Some(local)), Err(Refusal::Missing));
        assert_eq!(
            auth.check("grpc", Some(b"s3cret"), Some(local)),
            Err(Refusal::Malformed)
        );
        assert_eq!(
            auth.check("grpc", Some(b"Bearer s3cre"), Some(local)),
            Err(Refusal::Wrong)
        );
    }
}
