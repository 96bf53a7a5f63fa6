//! What POST /workers accepts: the shape of a worker URL, the hosts it may name and the size
//! of the pool.
//!
//! A registration names a URL the router will then connect to and send user prompts to, so
//! only `http://HOST:PORT` or `https://HOST:PORT` is taken (no user info, path, query or
//! fragment), and HOST must be in `--worker_url_allowlist`, or, without one, resolve to a
//! loopback address; the job's nodes (given by the launcher) and the hosts of workers already
//! in the pool are always accepted. A host that does not resolve is refused with the same
//! answer as one that resolves elsewhere, so the endpoint tells nothing about the network.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

/// Default of `--max_workers`.
pub const DEFAULT_MAX_WORKERS: usize = 256;

/// Default of `--worker_lease_s`: three of llmapi-launch's longest renewal periods (10 s).
pub const DEFAULT_WORKER_LEASE_S: u64 = 30;

/// How long one host name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Which registrations POST /workers accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationPolicy {
    /// Hosts whose workers may register (`--worker_url_allowlist`); `None`: loopback only.
    pub allowlist: Option<Vec<String>>,
    /// The job's node names, always accepted (set by the launcher for its embedded router).
    pub job_hosts: Vec<String>,
    /// Most workers the pool may hold.
    pub max_workers: usize,
    /// How long a registration lasts unless renewed (`--worker_lease_s`); `None`: forever.
    pub lease: Option<Duration>,
}

impl Default for RegistrationPolicy {
    fn default() -> Self {
        Self {
            allowlist: None,
            job_hosts: Vec::new(),
            max_workers: DEFAULT_MAX_WORKERS,
            lease: Some(Duration::from_secs(DEFAULT_WORKER_LEASE_S)),
        }
    }
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The URL is not `http(s)://HOST:PORT`.
    #[error(
        "worker url {url:?} is not accepted ({reason}); send http://HOST:PORT or https://HOST:PORT"
    )]
    BadUrl {
        /// The URL as sent.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The host is not one workers may register from.
    #[error(
        "worker host {host:?} is not allowed: it is not in --worker_url_allowlist, not a node of this job and not a loopback address (or it does not resolve); add it to --worker_url_allowlist"
    )]
    HostNotAllowed {
        /// The host as sent.
        host: String,
    },
}

/// A worker URL of the accepted shape, normalized (scheme and host in lower case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUrl {
    /// `http` or `https`.
    pub scheme: &'static str,
    /// Host name or address (an IPv6 address without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl std::fmt::Display for WorkerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}://[{}]:{}", self.scheme, self.host, self.port)
        } else {
            write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
        }
    }
}

impl WorkerUrl {
    /// Parses `url`, refusing anything but `http(s)://HOST:PORT` with an optional final `/`.
    pub fn parse(url: &str) -> Result<Self, Refused> {
        let bad = |reason| Refused::BadUrl {
            url: url.to_owned(),
            reason,
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => "http",
            "https" => "https",
            _ => return Err(bad("only http and https are accepted")),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('@') {
            return Err(bad("user info is not accepted"));
        }
        if authority.contains(['/', '?', '#', '\\']) {
            return Err(bad("a path, query or fragment is not accepted"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, port) = v6.split_once("]:").ok_or_else(|| bad("no port"))?;
            let ip: std::net::Ipv6Addr = host.parse().map_err(|_| bad("bad IPv6 address"))?;
            (ip.to_string(), port)
        } else {
            let (host, port) = authority.rsplit_once(':').ok_or_else(|| bad("no port"))?;
            let host = host.to_ascii_lowercase();
            let name_ok = !host.is_empty()
                && host.len() <= 253
                && host
                    .split('.')
                    .all(|l| !l.is_empty() && l.len() <= 63 && !l.starts_with('-'))
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
            if !name_ok {
                return Err(bad("the host is not a DNS name or an address"));
            }
            (host, port)
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => return Err(bad("the port is not a number from 1 to 65535")),
        };
        Ok(Self { scheme, host, port })
    }
}

/// The addresses `host` resolves to (an address resolves to itself); empty when it does not
/// resolve in time.
async fn resolve(host: &str) -> Vec<IpAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return vec![ip.to_canonical()];
    }
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, 0))).await {
        Ok(Ok(addrs)) => addrs.map(|a| a.ip().to_canonical()).collect(),
        _ => Vec::new(),
    }
}

/// Whether a host resolving to `addrs` may register: every address must be allowed, and a
/// host that resolved to nothing is not.
pub fn addresses_allowed(addrs: &[IpAddr], allowed: &HashSet<IpAddr>, loopback: bool) -> bool {
    !addrs.is_empty()
        && addrs
            .iter()
            .all(|a| allowed.contains(a) || (loopback && a.is_loopback()))
}

impl RegistrationPolicy {
    /// Checks that `url`'s host may register. `pool_hosts` are the hosts of the workers
    /// already in the pool.
    pub async fn check_host(&self, url: &WorkerUrl, pool_hosts: &[String]) -> Result<(), Refused> {
        let names: Vec<&str> = self
            .allowlist
            .iter()
            .flatten()
            .chain(&self.job_hosts)
            .chain(pool_hosts)
            .map(String::as_str)
            .collect();
        if names.iter().any(|n| n.eq_ignore_ascii_case(&url.host)) {
            return Ok(());
        }
        let (addrs, allowed) = tokio::join!(
            resolve(&url.host),
            futures::future::join_all(names.iter().map(|n| resolve(n)))
        );
        let allowed: HashSet<IpAddr> = allowed.into_iter().flatten().collect();
        if addresses_allowed(&addrs, &allowed, self.allowlist.is_none()) {
            Ok(())
        } else {
            Err(Refused::HostNotAllowed {
                host: url.host.clone(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_with_host_and_port_are_accepted() {
        for (url, want) in [
            ("http://127.0.0.1:50051", "http://127.0.0.1:50051"),
            ("HTTP://Node01.Cluster:7/", "http://node01.cluster:7"),
            ("https://[::1]:443", "https://[::1]:443"),
        ] {
            assert_eq!(
                WorkerUrl::parse(url).map(|u| u.to_string()),
                Ok(want.to_owned())
            );
        }
        for url in [
            "ftp://127.0.0.1:21",
            "file:///etc/passwd",
            "127.0.0.1:50051",
            "http://user@127.0.0.1:50051",
            "http://user:pw@127.0.0.1:50051",
            "http://127.0.0.1:50051@evil:80",
            "http://127.0.0.1:50051/path",
            "http://127.0.0.1:50051?q=1",
            "http://127.0.0.1:50051#@evil",
            "http://127.0.0.1:50051\\@evil",
            "http://127.0.0.1",
            "http://127.0.0.1:",
            "http://127.0.0.1:0",
            "http://127.0.0.1:70000",
            "http://127.0.0.1:+80",
            "http://:80",
            "http://bad_host:80",
            "http://a%2e:80",
            "http://[::1:80",
        ] {
            assert!(
                matches!(WorkerUrl::parse(url), Err(Refused::BadUrl { .. })),
                "{url}"
            );
        }
    }

    #[test]
    fn an_unresolved_host_is_refused_like_one_outside_the_allowed_set() {
        let allowed: HashSet<IpAddr> = ["10.0.0.1".parse().unwrap()].into();
        let inside: IpAddr = "10.0.0.1".parse().unwrap();
        let outside: IpAddr = "10.0.0.2".parse().unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(addresses_allowed(&[inside], &allowed, false));
        assert!(!addresses_allowed(&[outside], &allowed, false));
        assert!(!addresses_allowed(&[inside, outside], &allowed, false));
        assert!(!addresses_allowed(&[], &allowed, true));
        assert!(addresses_allowed(&[lo], &allowed, true));
        assert!(!addresses_allowed(&[lo], &allowed, false));
    }

    #[tokio::test]
    async fn loopback_is_allowed_only_without_an_allowlist() {
        let url = WorkerUrl::parse("http://127.0.0.1:50051").unwrap();
        let open = RegistrationPolicy::default();
        assert_eq!(open.check_host(&url, &[]).await, Ok(()));
        let listed = RegistrationPolicy {
            allowlist: Some(vec!["127.0.0.2".into()]),
            ..RegistrationPolicy::default()
        };
        assert!(listed.check_host(&url, &[]).await.is_err());
        // The job's nodes and the pool's hosts stay allowed with an allowlist.
        let job = RegistrationPolicy {
            job_hosts: vec!["127.0.0.1".into()],
            ..listed.clone()
        };
        assert_eq!(job.check_host(&url, &[]).await, Ok(()));
        assert_eq!(listed.check_host(&url, &["127.0.0.1".into()]).await, Ok(()));
        let outside = WorkerUrl::parse("http://127.0.0.3:50051").unwrap();
        let refused = listed.check_host(&outside, &[]).await.unwrap_err();
        assert!(refused.to_string().contains("--worker_url_allowlist"));
    }
}
