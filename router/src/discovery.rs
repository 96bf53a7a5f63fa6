//! `--worker_discovery dns:[https://]NAME:PORT`: the pool follows the address records of a DNS
//! name, as a Kubernetes headless service (one A/AAAA record per ready pod) or a Consul service
//! publishes them. Every `--worker_discovery_interval_s` the name is resolved again: a new
//! address joins the pool as `SCHEME://ADDRESS:PORT`, an address gone from the answer leaves it
//! (its requests in flight finish; nothing new is routed to it). A failed lookup (timeout,
//! server failure) changes nothing, so that a DNS outage does not empty the fleet; only an
//! answer with no records does. Workers found this way are called with the same worker token
//! and TLS settings as any other.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;

use crate::pool::Pool;

/// Default of `--worker_discovery_interval_s`.
pub const DEFAULT_DISCOVERY_INTERVAL_S: u64 = 5;

/// How long one lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// A `--worker_discovery` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSource {
    /// `http` or `https`: how the workers found are called.
    pub scheme: &'static str,
    /// The name whose address records list the workers.
    pub name: String,
    /// The workers' gRPC port.
    pub port: u16,
}

impl FromStr for DnsSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "use dns:NAME:PORT or dns:https://NAME:PORT (e.g. dns:llmapi-workers.default.svc.cluster.local:50051)";
        let rest = s
            .strip_prefix("dns:")
            .ok_or_else(|| format!("{s:?} is not a discovery source; {usage}"))?;
        let (scheme, rest) = if let Some(r) = rest.strip_prefix("https://") {
            ("https", r)
        } else if let Some(r) = rest.strip_prefix("http://") {
            ("http", r)
        } else {
            ("http", rest)
        };
        let (name, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} has no port; {usage}"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: {port:?} is not a port number; {usage}"))?;
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
        if !valid {
            return Err(format!("{s:?}: {name:?} is not a DNS name; {usage}"));
        }
        Ok(Self {
            scheme,
            name: name.to_owned(),
            port,
        })
    }
}

impl DnsSource {
    /// The worker URL of one resolved address.
    pub fn url(&self, ip: IpAddr) -> String {
        match ip {
            IpAddr::V4(v4) => format!("{}://{v4}:{}", self.scheme, self.port),
            IpAddr::V6(v6) => format!("{}://[{v6}]:{}", self.scheme, self.port),
        }
    }
}

/// What one lookup says of the fleet.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// These addresses (possibly none: the name has no records).
    Addresses(BTreeSet<IpAddr>),
    /// The lookup failed; the fleet is left as it is.
    Failed(String),
}

/// Follows a [`DnsSource`] into a pool.
pub struct Discovery {
    source: DnsSource,
    resolver: TokioResolver,
    interval: Duration,
    max_workers: usize,
}

impl Discovery {
    /// Resolves through `nameserver` (`--worker_discovery_nameserver`), else the system's
    /// resolver configuration (/etc/resolv.conf, with its search domains, and /etc/hosts).
    pub fn new(
        source: DnsSource,
        nameserver: Option<SocketAddr>,
        interval: Duration,
        max_workers: usize,
    ) -> Result<Self, String> {
        let provider = TokioConnectionProvider::default();
        let mut builder = match nameserver {
            Some(addr) => {
                let mut config = ResolverConfig::new();
                config.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(addr, Protocol::Tcp));
                TokioResolver::builder_with_config(config, provider)
            }
            None => TokioResolver::builder(provider).map_err(|e| {
                format!("cannot read the system's resolver configuration: {e}; give --worker_discovery_nameserver HOST:PORT")
            })?,
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        // Every pass asks again: the records are the fleet, and a pass is seconds apart.
        opts.cache_size = 0;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.timeout = LOOKUP_TIMEOUT;
        opts.attempts = 1;
        Ok(Self {
            source,
            resolver: builder.build(),
            interval,
            max_workers,
        })
    }

    async fn lookup(&self) -> Answer {
        let lookup = self.resolver.lookup_ip(self.source.name.as_str());
        match tokio::time::timeout(LOOKUP_TIMEOUT * 2, lookup).await {
            Ok(Ok(found)) => Answer::Addresses(found.iter().collect()),
            // An answer without addresses (NXDOMAIN, no A/AAAA records), not a failed lookup.
            Ok(Err(e)) if e.is_no_records_found() => Answer::Addresses(BTreeSet::new()),
            Ok(Err(e)) => Answer::Failed(e.to_string()),
            Err(_) => Answer::Failed(format!("no answer within {:?}", LOOKUP_TIMEOUT * 2)),
        }
    }

    /// Resolves the name now and again every interval, forever, keeping the workers it added
    /// equal to the name's addresses.
    pub async fn run(self, pool: Arc<Pool>) {
        let mut ours: BTreeSet<String> = BTreeSet::new();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let addresses = match self.lookup().await {
                Answer::Addresses(a) => {
                    if failing {
                        tracing::info!(name = %self.source.name, "worker discovery lookups succeed again");
                        failing = false;
                    }
                    a
                }
                Answer::Failed(e) => {
                    if !failing {
                        tracing::warn!(name = %self.source.name, error = %e, "worker discovery lookup failed; keeping the {} workers found before", ours.len());
                        failing = true;
                    }
                    continue;
                }
            };
            let wanted: BTreeSet<String> = addresses
                .into_iter()
                .map(|ip| self.source.url(ip))
                .collect();
            self.apply(&pool, &mut ours, &wanted);
        }
    }

    /// Adds the wanted URLs the pool lacks and removes the ones this source added that are no
    /// longer wanted.
    fn apply(&self, pool: &Pool, ours: &mut BTreeSet<String>, wanted: &BTreeSet<String>) {
        for url in ours.difference(wanted).cloned().collect::<Vec<_>>() {
            pool.remove(&url);
            ours.remove(&url);
            tracing::info!(worker = %url, name = %self.source.name, "worker removed: its address left the DNS records");
        }
        for url in wanted.difference(ours).cloned().collect::<Vec<_>>() {
            match pool.add_capped(&url, self.max_workers) {
                Ok((_, true)) => {
                    ours.insert(url.clone());
                    tracing::info!(worker = %url, name = %self.source.name, "worker added from DNS");
                }
                // Already in the pool by --worker_urls or registration: not ours to remove.
                Ok((_, false)) => {}
                Err(e) => {
                    tracing::warn!(worker = %url, name = %self.source.name, "worker found in DNS not added: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_with_their_scheme_and_port() {
        let s: DnsSource = "dns:llmapi-workers.default.svc.cluster.local:50051"
            .parse()
            .expect("valid");
        assert_eq!(s.scheme, "http");
        assert_eq!(s.name, "llmapi-workers.default.svc.cluster.local");
        assert_eq!(s.port, 50051);
        assert_eq!(
            s.url("10.0.0.7".parse().expect("ip")),
            "http://10.0.0.7:50051"
        );
        let s: DnsSource = "dns:https://workers:9000".parse().expect("valid");
        assert_eq!(s.scheme, "https");
        assert_eq!(
            s.url("fd00::1".parse().expect("ip")),
            "https://[fd00::1]:9000"
        );
        for bad in [
            "workers:9000",
            "dns:workers",
            "dns:workers:0",
            "dns:workers:http",
            "dns::9000",
            "dns:wor kers:9000",
            "dns:workers/x:9000",
        ] {
            let e = bad.parse::<DnsSource>().expect_err(bad);
            assert!(e.contains("dns:NAME:PORT"), "{bad}: {e}");
        }
    }
}
