//! Sampling the server's Prometheus `/metrics` during a run (KV cache usage, queue depth, running
//! requests), saved with the result so a throughput figure can be read next to the server state
//! that produced it.
//!
//! Only series whose names speak of the KV cache, queues or request counts are kept; a server
//! without `/metrics` is simply not sampled.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::body::Bytes;
use hyper::header::HOST;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::client::Endpoint;

/// One scrape: seconds since sampling began and the kept series by `name{labels}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsSample {
    /// Seconds since the first scrape.
    pub t: f64,
    /// Value of each kept series.
    pub values: BTreeMap<String, f64>,
}

/// Substrings of metric names worth keeping.
const KEPT: [&str; 11] = [
    "kv",
    "cache",
    "queue",
    "running",
    "waiting",
    "pending",
    "inflight",
    "in_flight",
    "num_requests",
    "generation_tokens",
    "prompt_tokens",
];

/// Parses Prometheus text exposition, keeping the series whose names contain a [`KEPT`] word.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // `name{labels} value [timestamp]`; labels may hold spaces inside quotes.
        let series_end = match line.find('}') {
            Some(close) if line.find('{').is_some_and(|open| open < close) => close + 1,
            _ => line.find(char::is_whitespace).unwrap_or(line.len()),
        };
        let (series, rest) = line.split_at(series_end);
        let name = series.split('{').next().unwrap_or("").to_ascii_lowercase();
        // A histogram's buckets are dozens of series per worker that a time series of gauges
        // cannot use; its _sum and _count are kept.
        if !KEPT.iter().any(|k| name.contains(k)) || name.ends_with("_bucket") {
            continue;
        }
        if let Some(Ok(v)) = rest.split_whitespace().next().map(str::parse::<f64>) {
            out.insert(series.to_string(), v);
        }
    }
    out
}

/// GETs the endpoint and returns the body text of a 200 response.
pub async fn fetch_text(ep: &Endpoint) -> Result<String, String> {
    let stream = TcpStream::connect(ep.addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(ep.path.as_str())
        .header(HOST, ep.host.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Scrapes every `interval` until `stop` turns true; stops early if the first scrape fails.
pub async fn sample_until(
    ep: Endpoint,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) -> Vec<MetricsSample> {
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let scrape = tokio::time::timeout(interval.max(Duration::from_secs(1)), fetch_text(&ep));
        match scrape.await {
            Ok(Ok(text)) => samples.push(MetricsSample {
                t: start.elapsed().as_secs_f64(),
                values: parse_prometheus(&text),
            }),
            Ok(Err(e)) if samples.is_empty() => {
                tracing::debug!(error = %e, "server has no usable /metrics; not sampling");
                break;
            }
            _ => {}
        }
    }
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_and_queue_series_are_kept_and_others_dropped() {
        let text = "# HELP x y\n# TYPE llmapi_kv_cache_usage gauge\n\
                    llmapi_kv_cache_usage{worker=\"a b\"} 0.25\n\
                    llmapi_queue_depth 3\n\
                    process_cpu_seconds_total 12.5\n\
                    llmapi_requests_running{model=\"m\"} 7 1700000000\n";
        let m = parse_prometheus(text);
        assert_eq!(m.get("llmapi_kv_cache_usage{worker=\"a b\"}"), Some(&0.25));
        assert_eq!(m.get("llmapi_queue_depth"), Some(&3.0));
        assert_eq!(m.get("llmapi_requests_running{model=\"m\"}"), Some(&7.0));
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn histogram_buckets_are_dropped_and_their_sum_and_count_kept() {
        let text = "llmapi_request_queue_time_seconds_bucket{le=\"0.1\"} 4\n\
                    llmapi_request_queue_time_seconds_bucket{le=\"+Inf\"} 5\n\
                    llmapi_request_queue_time_seconds_sum 0.7\n\
                    llmapi_request_queue_time_seconds_count 5\n";
        let m = parse_prometheus(text);
        assert_eq!(m.get("llmapi_request_queue_time_seconds_sum"), Some(&0.7));
        assert_eq!(m.get("llmapi_request_queue_time_seconds_count"), Some(&5.0));
        assert_eq!(m.len(), 2, "{m:?}");
    }
}
