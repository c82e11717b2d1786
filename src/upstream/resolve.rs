//! Upstream host names are resolved when a request needs them, never at start-up: a branch
//! that boots during a DNS outage still serves its cache, and a DNS change reaches the next
//! request without a restart. Answers are kept for a short time ([`DNS_TTL`]; the system
//! resolver reports no TTL, so this is the upper bound we honour) so a boot storm does not ask
//! DNS once per miss. Failures are not kept: the upstream is marked down and its probe asks
//! again.
//!
//! The lookup itself is a [`Lookup`], the system resolver in the product; a test injects its
//! own to move a name to another address. HTTP upstreams use the same cache through reqwest's
//! resolver hook.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

/// How long a resolved address is used before the name is looked up again.
pub const DNS_TTL: Duration = Duration::from_secs(60);

/// A name lookup: host → addresses.
pub trait Lookup: Send + Sync {
    fn lookup(&self, host: &str) -> BoxFuture<'static, io::Result<Vec<IpAddr>>>;
}

/// The system resolver (getaddrinfo, so /etc/hosts and nsswitch apply).
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(&self, host: &str) -> BoxFuture<'static, io::Result<Vec<IpAddr>>> {
        let host = host.to_string();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// Resolved names, each kept for the TTL.
pub struct Resolver {
    lookup: Arc<dyn Lookup>,
    ttl: Duration,
    cached: Mutex<HashMap<String, (Instant, Vec<IpAddr>)>>,
}

impl Resolver {
    pub fn new(lookup: Arc<dyn Lookup>, ttl: Duration) -> Arc<Resolver> {
        Arc::new(Resolver {
            lookup,
            ttl,
            cached: Mutex::new(HashMap::new()),
        })
    }

    /// The system resolver with [`DNS_TTL`].
    pub fn system() -> Arc<Resolver> {
        Resolver::new(Arc::new(SystemLookup), DNS_TTL)
    }

    /// The addresses of `host` (an IP literal is its own answer).
    pub async fn resolve(&self, host: &str) -> io::Result<Vec<IpAddr>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        if let Some((at, addrs)) = self.cached.lock().unwrap().get(host) {
            if at.elapsed() < self.ttl {
                return Ok(addrs.clone());
            }
        }
        let addrs = self.lookup.lookup(host).await?;
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} has no address"),
            ));
        }
        let mut cached = self.cached.lock().unwrap();
        // Names come from the config only, so this stays as small as the upstream list.
        cached.insert(host.to_string(), (Instant::now(), addrs.clone()));
        Ok(addrs)
    }
}

/// The same resolver for reqwest's connections to HTTP upstreams.
pub struct ForReqwest(pub Arc<Resolver>);

impl reqwest::dns::Resolve for ForReqwest {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let resolver = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = resolver.resolve(&host).await?;
            // Port 0: reqwest puts the URL's port in.
            let addrs: reqwest::dns::Addrs =
                Box::new(addrs.into_iter().map(|ip| std::net::SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A lookup a test controls: the current answer and how often it was asked.
    struct Moving {
        answer: Mutex<IpAddr>,
        asked: Mutex<u32>,
    }

    impl Lookup for Moving {
        fn lookup(&self, _host: &str) -> BoxFuture<'static, io::Result<Vec<IpAddr>>> {
            *self.asked.lock().unwrap() += 1;
            let a = *self.answer.lock().unwrap();
            Box::pin(async move { Ok(vec![a]) })
        }
    }

    #[tokio::test]
    async fn a_name_is_looked_up_once_per_ttl_and_a_change_is_seen_after_it() {
        let ip = |n| IpAddr::V4(Ipv4Addr::new(127, 0, 0, n));
        let moving = Arc::new(Moving {
            answer: Mutex::new(ip(2)),
            asked: Mutex::new(0),
        });
        let r = Resolver::new(moving.clone(), Duration::from_millis(100));
        assert_eq!(r.resolve("cucm").await.unwrap(), vec![ip(2)]);
        *moving.answer.lock().unwrap() = ip(3);
        assert_eq!(
            r.resolve("cucm").await.unwrap(),
            vec![ip(2)],
            "within the TTL"
        );
        assert_eq!(*moving.asked.lock().unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(
            r.resolve("cucm").await.unwrap(),
            vec![ip(3)],
            "after the TTL"
        );
        assert_eq!(
            r.resolve("10.1.2.3").await.unwrap(),
            vec!["10.1.2.3".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            *moving.asked.lock().unwrap(),
            2,
            "an IP literal needs no lookup"
        );
    }

    #[tokio::test]
    async fn an_invalid_name_fails_per_request_and_is_not_remembered() {
        let r = Resolver::system();
        assert!(r.resolve("central.invalid").await.is_err());
        assert!(r.cached.lock().unwrap().is_empty());
    }
}
