//! One benchmark run: the test request, the arrival process, the concurrency limit, progress,
//! /metrics sampling and Ctrl-C.
//!
//! Requests are released as benchmark_serving.py's `get_request` does: all at time 0 when the
//! rate is infinite, else after gamma-distributed gaps (shape = burstiness, mean = 1 / rate; a
//! Poisson process at burstiness 1). At most --max-concurrency are in flight; the others wait in
//! FIFO order. Ctrl-C stops sending, abandons the requests in flight and returns what finished.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::args::{Backend, BenchArgs};
use crate::client::{self, Endpoint, ReadOptions};
use crate::dataset::{Prompt, SampleRequest};
use crate::metrics::RequestOutput;
use crate::progress::Progress;
use crate::server_metrics::{self, MetricsSample};

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    /// Outcomes of the requests that finished, in send order (all of them unless interrupted).
    pub outputs: Vec<RequestOutput>,
    /// Seconds from the first request to the last completion (or to Ctrl-C).
    pub duration: f64,
    /// True when Ctrl-C ended the run early.
    pub interrupted: bool,
    /// Samples of the server's /metrics taken during the run.
    pub server_metrics: Vec<MetricsSample>,
}

/// A run that could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The single-prompt test request failed.
    #[error(
        "Initial test run failed - Please make sure benchmark arguments are correctly specified. \
         Error: {0}"
    )]
    TestRequest(String),
    /// Ctrl-C arrived before the run started.
    #[error("interrupted before the benchmark started")]
    Interrupted,
}

/// The JSON body of one request, as the original's request functions build it.
pub fn request_body(args: &BenchArgs, req: &SampleRequest, streaming: bool) -> Bytes {
    let prompt = match &req.prompt {
        Prompt::Text(t) => json!(t),
        Prompt::Ids(ids) => json!(ids),
    };
    let mut body = match args.backend {
        Backend::Openai => json!({
            "model": args.request_model(),
            "prompt": prompt,
            "temperature": 0.0,
            "repetition_penalty": 1.0,
            "max_tokens": req.expected_output_len,
            "logprobs": args.logprobs,
            "stream": streaming,
        }),
        Backend::OpenaiChat => {
            let mut b = json!({
                "model": args.request_model(),
                "messages": [],
                "temperature": 0.0,
                "max_completion_tokens": req.expected_output_len,
                "stream": streaming,
            });
            match &req.prompt {
                Prompt::Ids(ids) => b["prompt_token_ids"] = json!(ids),
                Prompt::Text(t) => {
                    b["messages"] =
                        json!([{"role": "user", "content": [{"type": "text", "text": t}]}]);
                }
            }
            b
        }
    };
    if streaming {
        body["stream_options"] = json!({"include_usage": true});
    }
    if args.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    if let Some(v) = args.top_p {
        body["top_p"] = json!(v);
    }
    if let Some(v) = args.top_k {
        body["top_k"] = json!(v);
    }
    if let Some(v) = args.min_p {
        body["min_p"] = json!(v);
    }
    body["temperature"] = json!(args.temperature.unwrap_or(0.0));
    Bytes::from(body.to_string())
}

/// Gaps between request releases in seconds (none when the rate is infinite).
pub fn arrival_gaps(n: usize, rate: f64, burstiness: f64, seed: u64) -> Vec<f64> {
    if rate.is_infinite() || n == 0 {
        return vec![0.0; n];
    }
    let theta = 1.0 / (rate * burstiness);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_a771_u64);
    match Gamma::new(burstiness, theta) {
        Ok(g) => (0..n).map(|_| g.sample(&mut rng)).collect(),
        // Unreachable after validation (positive shape and scale); fall back to uniform gaps.
        Err(_) => vec![1.0 / rate; n],
    }
}

/// Runs the benchmark against `endpoint` until every request finished or `stop` fires.
pub async fn run(
    args: &BenchArgs,
    requests: &[SampleRequest],
    endpoint: Arc<Endpoint>,
    metrics_endpoint: Option<Endpoint>,
    mut stop: watch::Receiver<bool>,
) -> Result<RunOutcome, RunError> {
    let streaming = !args.non_streaming;
    let opts = ReadOptions {
        backend: args.backend,
        streaming,
        request_timeout: Duration::from_secs_f64(args.request_timeout),
        chunk_timeout: args.chunk_timeout.map(Duration::from_secs_f64),
        ignore_eos: args.ignore_eos,
    };
    let bodies: Vec<Bytes> = requests
        .iter()
        .map(|r| request_body(args, r, streaming))
        .collect();

    if args.no_test_input {
        println!("Skipping initial test run. Starting main benchmark run...");
    } else {
        println!("Starting initial single prompt test run...");
        let test = client::send_request(
            &endpoint,
            bodies[0].clone(),
            requests[0].prompt_len,
            u64::from(requests[0].expected_output_len),
            opts,
        );
        let out = tokio::select! {
            out = test => out,
            _ = stop.wait_for(|s| *s) => return Err(RunError::Interrupted),
        };
        if !out.success {
            return Err(RunError::TestRequest(out.error));
        }
        println!("Initial test run completed. Starting main benchmark run...");
    }

    let distribution = if args.burstiness == 1.0 {
        "Poisson process"
    } else {
        "Gamma distribution"
    };
    println!(
        "Traffic request rate: {}",
        crate::report::py_float(args.request_rate)
    );
    println!(
        "Burstiness factor: {} ({distribution})",
        crate::report::py_float(args.burstiness)
    );
    let max_c = args
        .max_concurrency
        .map_or("None".to_string(), |c| c.to_string());
    println!("Maximum request concurrency: {max_c}");

    let n = requests.len();
    let gaps = arrival_gaps(n, args.request_rate, args.burstiness, args.seed);
    let semaphore = args.max_concurrency.map(|c| Arc::new(Semaphore::new(c)));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(usize, RequestOutput)>();
    let (sampler_stop, sampler) = match metrics_endpoint {
        Some(ep) if args.metrics_interval > 0.0 => {
            let (tx, rx) = watch::channel(false);
            let interval = Duration::from_secs_f64(args.metrics_interval);
            (
                Some(tx),
                Some(tokio::spawn(server_metrics::sample_until(ep, interval, rx))),
            )
        }
        _ => (None, None),
    };

    let mut progress = Progress::new(n as u64, args.disable_tqdm);
    let start = Instant::now();
    let lens: Vec<(u64, u64)> = requests
        .iter()
        .map(|r| (r.prompt_len, u64::from(r.expected_output_len)))
        .collect();
    let dispatcher_endpoint = endpoint.clone();
    let mut dispatcher = tokio::spawn(async move {
        let mut inner = JoinSet::new();
        for (i, (body, gap)) in bodies.into_iter().zip(gaps).enumerate() {
            let (ep, tx, sem) = (
                dispatcher_endpoint.clone(),
                done_tx.clone(),
                semaphore.clone(),
            );
            let (prompt_len, output_len) = lens[i];
            inner.spawn(async move {
                // The semaphore is never closed, so acquire only fails if it were; then run.
                let _permit = match &sem {
                    Some(s) => s.clone().acquire_owned().await.ok(),
                    None => None,
                };
                let out = client::send_request(&ep, body, prompt_len, output_len, opts).await;
                let _ = tx.send((i, out));
            });
            if gap > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(gap)).await;
            }
        }
        // Keep the request tasks owned here so aborting the dispatcher aborts them too.
        while inner.join_next().await.is_some() {}
    });

    let mut slots: Vec<Option<RequestOutput>> = vec![None; n];
    let mut received = 0;
    let mut interrupted = false;
    while received < n {
        tokio::select! {
            msg = done_rx.recv() => match msg {
                Some((i, out)) => {
                    progress.record(&out);
                    slots[i] = Some(out);
                    received += 1;
                }
                None => break,
            },
            _ = stop.wait_for(|s| *s) => {
                interrupted = true;
                break;
            }
        }
    }
    let duration = start.elapsed().as_secs_f64();
    dispatcher.abort();
    let _ = (&mut dispatcher).await;
    progress.finish();

    let server_metrics = match (sampler_stop, sampler) {
        (Some(tx), Some(handle)) => {
            let _ = tx.send(true);
            handle.await.unwrap_or_default()
        }
        _ => Vec::new(),
    };
    Ok(RunOutcome {
        outputs: slots.into_iter().flatten().collect(),
        duration,
        interrupted,
        server_metrics,
    })
}

/// The server-metrics samples as saved in the result JSON (`null` when none were taken).
pub fn server_metrics_json(samples: &[MetricsSample], interval: f64) -> Value {
    if samples.is_empty() {
        return Value::Null;
    }
    json!({"interval_s": interval, "samples": samples})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_and_cv2(v: &[f64]) -> (f64, f64) {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64;
        (m, var / (m * m))
    }

    #[test]
    fn infinite_rate_sends_everything_at_once() {
        assert_eq!(arrival_gaps(5, f64::INFINITY, 1.0, 0), vec![0.0; 5]);
    }

    #[test]
    fn gaps_average_one_over_the_rate_with_burstiness_setting_the_spread() {
        // Gamma(k, 1/(rate k)): mean 1/rate, squared coefficient of variation 1/k.
        // 20,000 draws: sampling error of the mean is under 2% (k = 0.25: CV 2, 2/sqrt(20000)).
        for k in [0.25, 1.0, 4.0] {
            let (mean, cv2) = mean_and_cv2(&arrival_gaps(20_000, 50.0, k, 7));
            assert!(
                (mean - 0.02).abs() < 0.02 * 0.05,
                "burstiness {k}: mean {mean}"
            );
            assert!(
                (cv2 - 1.0 / k).abs() < 0.15 / k,
                "burstiness {k}: cv2 {cv2}"
            );
        }
    }
}
