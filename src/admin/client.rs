//! The command-line side of the admin endpoint: `status`, `phones` and the `cache` commands of a
//! running appliance ask it over HTTP through [`AdminClient`].

use std::time::Duration;

use serde::de::DeserializeOwned;

/// Why a request to the admin endpoint gave no answer to use.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Nothing listens there (connection refused, unreachable, timed out).
    #[error("cannot reach the appliance at {base} ({why}); is `branchtftp serve` running? (admin.listen)")]
    Unreachable { base: String, why: String },
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: bad answer: {why}")]
    BadAnswer { url: String, why: String },
}

/// An HTTP client for one appliance's admin endpoint.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    /// `admin` is `HOST:PORT` or `http://HOST:PORT`; `token` goes out as a bearer token (needed
    /// for state-changing calls from anywhere but loopback). `timeout` bounds each request.
    pub fn new(admin: &str, token: Option<String>, timeout: Duration) -> Result<Self, AdminError> {
        let base = admin.trim_end_matches('/');
        let base = if base.starts_with("http://") || base.starts_with("https://") {
            base.to_string()
        } else {
            format!("http://{base}")
        };
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(3))
            .no_proxy()
            .build()
            .map_err(|e| AdminError::Unreachable {
                base: base.clone(),
                why: e.to_string(),
            })?;
        Ok(AdminClient { base, token, http })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request to `path` and returns the body of a 2xx answer.
    pub async fn call(&self, method: reqwest::Method, path: &str) -> Result<Vec<u8>, AdminError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| AdminError::Unreachable {
            base: self.base.clone(),
            why: e.to_string(),
        })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| AdminError::BadAnswer {
            url: url.clone(),
            why: e.to_string(),
        })?;
        if !status.is_success() {
            return Err(AdminError::Status {
                url,
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        Ok(body.to_vec())
    }

    /// GETs `path` and decodes its JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, AdminError> {
        let body = self.call(reqwest::Method::GET, path).await?;
        serde_json::from_slice(&body).map_err(|e| AdminError::BadAnswer {
            url: format!("{}{path}", self.base),
            why: e.to_string(),
        })
    }
}

/// Writes to stdout, ignoring a reader that went away (`branchtftp phones | head -1`): `print!`
/// would panic on the closed pipe.
pub fn print(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}
