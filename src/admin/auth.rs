//! Who may change the appliance's state through the admin endpoint. `admin.listen` may be a
//! management address, so a fleet's Prometheus can scrape `/metrics` from afar; reading stays
//! open to whoever reaches it, but `POST /sync`, `POST /cache/verify` and `DELETE /cache/NAME`
//! are refused (403) unless the peer is loopback (127.0.0.0/8, ::1, IPv4-mapped included) or the
//! request carries `Authorization: Bearer <token>` with the token from `admin.token_file`.
//!
//! The token file must be readable by its owner only (mode 0600 or 0400, like an ssh key): a
//! token other local users can read is refused at start rather than trusted.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::warn;

/// Why `admin.token_file` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("admin.token_file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "admin.token_file {}: mode {mode:04o} lets other users read the token; \
         chmod 600 it (owned by the service user)",
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("admin.token_file {}: empty; write a long random token, e.g. `openssl rand -hex 32`", path.display())]
    Empty { path: PathBuf },
}

/// Reads the token (surrounding whitespace trimmed), refusing a file group or others can read.
pub fn read_token(path: &Path) -> Result<String, TokenError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    let token = std::fs::read_to_string(path)
        .map_err(io)?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(token)
}

/// The rule for state-changing requests.
#[derive(Debug, Default)]
pub struct AdminAuth {
    token: Option<String>,
}

impl AdminAuth {
    /// Loopback only (no `admin.token_file`).
    pub fn loopback_only() -> AdminAuth {
        AdminAuth { token: None }
    }

    /// From `admin.token_file`, if set.
    pub fn from_config(token_file: Option<&Path>) -> Result<AdminAuth, TokenError> {
        Ok(AdminAuth {
            token: token_file.map(read_token).transpose()?,
        })
    }

    /// Whether a peer with this `Authorization` header may change state.
    pub fn permits(&self, peer: IpAddr, authorization: Option<&str>) -> bool {
        if peer.to_canonical().is_loopback() {
            return true;
        }
        let (Some(token), Some(given)) = (&self.token, authorization) else {
            return false;
        };
        given
            .strip_prefix("Bearer ")
            .is_some_and(|g| same(g.trim().as_bytes(), token.as_bytes()))
    }
}

/// Compares without stopping at the first difference, so timing does not reveal the prefix.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware on the state-changing routes.
pub async fn require_trusted(
    State(auth): State<Arc<AdminAuth>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth.permits(peer.ip(), authorization) {
        return next.run(req).await;
    }
    warn!(
        peer = %peer, method = %req.method(), path = %req.uri().path(),
        token = authorization.is_some(),
        "admin: refused a state-changing request from a non-loopback peer without a valid token"
    );
    (
        StatusCode::FORBIDDEN,
        "forbidden: from loopback only, or with Authorization: Bearer <admin.token_file>\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn auth(token: &str) -> AdminAuth {
        AdminAuth {
            token: Some(token.into()),
        }
    }

    #[test]
    fn loopback_peers_need_no_token_others_need_the_right_one() {
        let a = auth("s3cret");
        for ip in ["127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1"] {
            assert!(a.permits(ip.parse().unwrap(), None), "{ip}");
        }
        let far: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(!a.permits(far, None));
        assert!(!a.permits(far, Some("Bearer s3cre")));
        assert!(!a.permits(far, Some("Bearer s3cret2")));
        assert!(!a.permits(far, Some("Basic s3cret")));
        assert!(a.permits(far, Some("Bearer s3cret")));
        assert!(!AdminAuth::loopback_only().permits(far, Some("Bearer ")));
        assert!(!a.permits("::ffff:10.1.2.3".parse().unwrap(), None));
    }

    #[test]
    fn a_token_file_other_users_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  abc123\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token(&path).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&path).unwrap(), "abc123");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(read_token(&path), Err(TokenError::Empty { .. })));
    }
}
