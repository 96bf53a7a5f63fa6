//! The six faults of the suite, each against its own cluster of real processes on loopback:
//! two workers (`llmapi-launch serve` with a gRPC address) behind one `llmapi-router`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::load::{Tally, burst, closed_loop, peak_rss_mib, run_request, signal};
use super::{Config, Report};
use crate::cluster::{SECRET, Worker, healthy_count, metric, metrics, routed, router, worker};
use crate::cluster::{migrations_off, wait_workers, workers};
use crate::wait_until;

/// How long a client waits for any one request before calling it hung.
const CLIENT_LIMIT: Duration = Duration::from_secs(60);
/// Router deadlines of the stalled-worker scenario (seconds).
const REQUEST_TIMEOUT_S: u64 = 20;
const FIRST_TOKEN_TIMEOUT_S: u64 = 5;
/// The drain timeout of the SIGTERM scenario (seconds).
const DRAIN_S: u64 = 8;

fn two_workers(cfg: &Config, extra: &[&str]) -> (Worker, Worker) {
    let (ga, gb) = (crate::free_port(), crate::free_port());
    (worker(&cfg.model, ga, extra), worker(&cfg.model, gb, extra))
}

fn router_over(cfg: &Config, a: &Worker, b: &Worker, extra: &[&str]) -> (crate::Proc, u16) {
    let mut flags = vec!["--eject_after_failures", "2"];
    flags.extend_from_slice(extra);
    let (p, port) = router(
        &cfg.model,
        &[a.grpc, b.grpc],
        "round_robin",
        &flags,
        Some(SECRET),
    );
    assert!(
        wait_workers(port, 2, Duration::from_secs(60)),
        "the router never saw both workers healthy"
    );
    (p, port)
}

fn stream_body(cfg: &Config, max_tokens: u32) -> Value {
    json!({"model": cfg.model_name, "prompt": "Tell me a long story about a lighthouse",
           "max_tokens": max_tokens, "ignore_eos": true, "stream": true})
}

/// Runs closed-loop load on a thread while `fault` runs on this one; the load stops when
/// `fault` returns.
fn under_load<T>(clients: usize, port: u16, body: &Value, fault: impl FnOnce() -> T) -> (Tally, T) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let load =
            s.spawn(|| closed_loop(clients, port, "/v1/completions", body, CLIENT_LIMIT, &stop));
        let out = fault();
        stop.store(true, Ordering::Relaxed);
        (load.join().unwrap_or_default(), out)
    })
}

fn check(checks: &mut Vec<(String, bool)>, what: impl Into<String>, ok: bool) {
    checks.push((what.into(), ok));
}

/// Scenario 1: SIGKILL one of two workers under streaming load, then start it again (as Slurm or
/// systemd would): no stream hangs, is cut or ends in error (the streams the killed worker was
/// running migrate to the other), and the worker is re-admitted.
pub fn kill_worker(cfg: &Config) -> Report {
    let (mut a, b) = two_workers(cfg, &[]);
    let (_router, port) = router_over(cfg, &a, &b, &[]);
    let clients = cfg.scale(8, 32);
    let phase = Duration::from_secs(cfg.scale(4, 10) as u64);
    let mut checks = Vec::new();
    let (tally, ()) = under_load(clients, port, &stream_body(cfg, 24), || {
        std::thread::sleep(phase);
        a.proc.kill();
        check(
            &mut checks,
            "killed worker ejected",
            wait_until(Duration::from_secs(15), || healthy_count(port) == 1),
        );
        std::thread::sleep(phase);
        a = worker(&cfg.model, a.grpc, &[]);
        check(
            &mut checks,
            "restarted worker re-admitted",
            wait_until(Duration::from_secs(30), || healthy_count(port) == 2),
        );
        let before = routed(port, a.grpc);
        check(
            &mut checks,
            "restarted worker takes requests again",
            wait_until(Duration::from_secs(30), || routed(port, a.grpc) > before),
        );
    });
    check(
        &mut checks,
        "no request ends in error: the killed worker's streams migrate",
        tally.refused.is_empty() && tally.unreachable == 0 && tally.in_band.is_empty(),
    );
    let moved = migrations_off(&metrics(port), Some(a.grpc));
    check(
        &mut checks,
        format!("the router counted the moves ({moved} migrations off the killed worker)"),
        moved > 0,
    );
    drop(b);
    Report::new(
        "kill -9 a worker",
        format!("{clients} streams, closed loop"),
        "SIGKILL worker A, restart it",
        tally,
        checks,
    )
}

/// Scenario 2: SIGSTOP a worker under load: its requests end with 504 inside the router's deadlines,
/// it is ejected, and after SIGCONT re-admitted.
pub fn stop_worker(cfg: &Config) -> Report {
    let (a, b) = two_workers(cfg, &[]);
    let (rt, ft) = (
        REQUEST_TIMEOUT_S.to_string(),
        FIRST_TOKEN_TIMEOUT_S.to_string(),
    );
    let (_router, port) = router_over(
        cfg,
        &a,
        &b,
        &["--request_timeout", &rt, "--first_token_timeout", &ft],
    );
    let clients = cfg.scale(8, 32);
    let phase = Duration::from_secs(cfg.scale(4, 10) as u64);
    let mut checks = Vec::new();
    let (tally, ()) = under_load(clients, port, &stream_body(cfg, 48), || {
        std::thread::sleep(phase);
        signal(a.proc.pid(), "STOP");
        check(
            &mut checks,
            "stopped worker ejected",
            wait_until(Duration::from_secs(20), || healthy_count(port) == 1),
        );
        std::thread::sleep(phase);
        signal(a.proc.pid(), "CONT");
        check(
            &mut checks,
            "resumed worker re-admitted",
            wait_until(Duration::from_secs(30), || healthy_count(port) == 2),
        );
    });
    signal(a.proc.pid(), "CONT");
    check(
        &mut checks,
        "errors are timeouts (504) only",
        tally.unreachable == 0
            && tally.in_band.iter().all(|c| *c == 504)
            && tally.refused.iter().all(|(s, _)| *s == 504),
    );
    drop((a, b));
    Report::new(
        "SIGSTOP a worker",
        format!("{clients} streams, closed loop"),
        format!("SIGSTOP worker A, SIGCONT; --request_timeout {rt} --first_token_timeout {ft}"),
        tally,
        checks,
    )
}

/// Scenario 3: Clients that disconnect right after their first token: afterwards the workers hold no
/// KV blocks of theirs and the router has nothing in flight.
pub fn disconnects(cfg: &Config) -> Report {
    let (a, b) = two_workers(cfg, &[]);
    let (_router, port) = router_over(cfg, &a, &b, &[]);
    let kv_used = || -> u64 {
        workers(port)
            .iter()
            .map(|w| w["kv_blocks_used"].as_u64().unwrap_or(0))
            .sum()
    };
    let baseline = kv_used();
    let clients = cfg.scale(100, 1000);
    let wave = 50;
    let body = stream_body(cfg, 512).to_string();
    let mut tally = Tally::default();
    let mut first = 0usize;
    for start in (0..clients).step_by(wave) {
        let n = wave.min(clients - start);
        let got: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|_| {
                    s.spawn(|| {
                        let stream = crate::send(
                            port,
                            "POST",
                            "/v1/completions",
                            Some(body.as_bytes()),
                            &[],
                        )
                        .ok()?;
                        // Dropped here: the client goes away mid-stream.
                        crate::sse::first_event(stream, CLIENT_LIMIT).map(|_| ())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().ok().flatten().map_or(0, |()| 1))
                .sum()
        });
        first += got;
        tally.lost += n - got;
    }
    let mut checks = Vec::new();
    let inflight = || metric(&metrics(port), "llmapi_router_inflight_requests");
    check(
        &mut checks,
        "router: 0 in flight afterwards",
        wait_until(Duration::from_secs(30), || inflight() == Some(0.0)),
    );
    let settled = wait_until(Duration::from_secs(30), || kv_used() <= baseline);
    check(
        &mut checks,
        format!(
            "workers: KV blocks in use back to {baseline} (now {})",
            kv_used()
        ),
        settled,
    );
    // A request after the storm is served.
    let after = run_request(port, "/v1/completions", &stream_body(cfg, 8), CLIENT_LIMIT);
    check(
        &mut checks,
        "a request afterwards completes",
        after == super::load::Outcome::Completed,
    );
    tally.completed = first;
    drop((a, b));
    Report::new(
        "clients disconnect mid-stream",
        format!("{clients} streams in waves of {wave}"),
        "each client hangs up after its first token",
        tally,
        checks,
    )
}

/// Scenario 4: A burst of 20x the router's in-flight limit: the excess gets 429 with Retry-After,
/// every admitted request completes, and memory stays bounded.
pub fn overload(cfg: &Config) -> Report {
    let (a, b) = two_workers(cfg, &[]);
    let limit = cfg.scale(8, 32);
    let limit_flag = limit.to_string();
    let (router_proc, port) = router_over(cfg, &a, &b, &["--max_inflight_requests", &limit_flag]);
    let count = 20 * limit;
    let body = json!({"model": cfg.model_name, "prompt": "Hello there", "max_tokens": 16,
                      "ignore_eos": true});
    let tally = burst(count, port, "/v1/completions", &body, CLIENT_LIMIT);
    let router_mib = peak_rss_mib(router_proc.pid()).unwrap_or(0);
    let worker_mib = [&a, &b]
        .iter()
        .filter_map(|w| peak_rss_mib(w.proc.pid()))
        .max()
        .unwrap_or(0);
    let mut checks = Vec::new();
    check(
        &mut checks,
        "every refusal is 429 with Retry-After",
        tally.refused.iter().all(|(s, r)| *s == 429 && *r) && tally.unreachable == 0,
    );
    check(
        &mut checks,
        format!("at least the limit ({limit}) completed"),
        tally.completed >= limit,
    );
    check(
        &mut checks,
        format!("router peak RSS {router_mib} MiB < 512 MiB"),
        router_mib < 512,
    );
    check(
        &mut checks,
        format!("worker peak RSS {worker_mib} MiB < 4096 MiB"),
        worker_mib < 4096,
    );
    drop((a, b));
    Report::new(
        "20x overload burst",
        format!("{count} requests at once, limit {limit}"),
        "--max_inflight_requests",
        tally,
        checks,
    )
}

/// Scenario 5: Requests that can never fit the KV cache, 10 a second, next to normal traffic: each
/// gets 400, no breaker opens, no normal request fails.
pub fn poison(cfg: &Config) -> Report {
    let kv = ["--set", "kv_cache_config.max_tokens=1024"];
    let (a, b) = two_workers(cfg, &kv);
    let (_router, port) = router_over(cfg, &a, &b, &[]);
    let clients = cfg.scale(4, 16);
    let seconds = cfg.scale(5, 20);
    let poison = json!({"model": cfg.model_name, "prompt": "Hello", "max_tokens": 1500});
    let mut checks = Vec::new();
    let mut poison_tally = Tally::default();
    let mut breaker_opened = false;
    let normal = json!({"model": cfg.model_name, "prompt": "Hello", "max_tokens": 8});
    let (tally, ()) = under_load(clients, port, &normal, || {
        let end = Instant::now() + Duration::from_secs(seconds as u64);
        while Instant::now() < end {
            let tick = Instant::now();
            poison_tally.add(&run_request(port, "/v1/completions", &poison, CLIENT_LIMIT));
            breaker_opened |= workers(port).iter().any(|w| w["breaker_open"] == true);
            std::thread::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed()));
        }
    });
    check(
        &mut checks,
        format!("all {} poison requests got 400", poison_tally.total()),
        poison_tally.refused_with(400) == poison_tally.total(),
    );
    check(&mut checks, "no breaker opened", !breaker_opened);
    check(
        &mut checks,
        "no normal request failed",
        tally.completed == tally.total(),
    );
    let failures = metric(&metrics(port), "llmapi_router_worker_failures_total");
    check(
        &mut checks,
        "worker failures counted: 0",
        failures == Some(0.0),
    );
    drop((a, b));
    Report::new(
        "poison requests",
        format!("{clients} normal clients + 10 poison/s for {seconds} s"),
        "max_tokens past the KV cache",
        tally,
        checks,
    )
}

/// Scenario 6: SIGTERM to the router under load: short requests in flight finish, new ones get 503,
/// a stream longer than the drain timeout ends with an in-band error, and the router exits.
pub fn drain(cfg: &Config) -> Report {
    let (a, b) = two_workers(cfg, &[]);
    let drain = DRAIN_S.to_string();
    let (mut router_proc, port) = router_over(cfg, &a, &b, &["--drain_timeout_s", &drain]);
    let clients = cfg.scale(4, 16);
    let short = stream_body(cfg, 8);
    let long = stream_body(cfg, 4000);
    let mut checks = Vec::new();
    let mut long_outcomes = Vec::new();
    let mut exited_in = None;
    let (tally, after) = under_load(clients, port, &short, || {
        std::thread::scope(|s| {
            let longs: Vec<_> = (0..2)
                .map(|_| s.spawn(|| run_request(port, "/v1/completions", &long, CLIENT_LIMIT)))
                .collect();
            std::thread::sleep(Duration::from_secs(2));
            signal(router_proc.pid(), "TERM");
            let termed = Instant::now();
            std::thread::sleep(Duration::from_millis(300));
            let after = run_request(port, "/v1/completions", &short, CLIENT_LIMIT);
            exited_in = router_proc
                .wait_exit(Duration::from_secs(DRAIN_S + 10))
                .map(|_| termed.elapsed());
            long_outcomes = longs.into_iter().filter_map(|h| h.join().ok()).collect();
            after
        })
    });
    check(
        &mut checks,
        format!("a new request while draining gets 503 with Retry-After ({after:?})"),
        matches!(
            after,
            super::load::Outcome::Refused {
                status: 503,
                retry_after: true
            }
        ),
    );
    check(
        &mut checks,
        format!("streams past the drain timeout end in-band ({long_outcomes:?})"),
        long_outcomes.len() == 2
            && long_outcomes
                .iter()
                .all(|o| matches!(o, super::load::Outcome::InBand(_))),
    );
    check(
        &mut checks,
        format!("router exits within the drain timeout + 5 s ({exited_in:?})"),
        exited_in.is_some_and(|t| t < Duration::from_secs(DRAIN_S + 5)),
    );
    check(
        &mut checks,
        "the short load saw only completions, 503s and a closed listener",
        tally.in_band.is_empty() && tally.refused.iter().all(|(s, _)| *s == 503),
    );
    drop((a, b));
    Report::new(
        "SIGTERM the router",
        format!("{clients} short streams + 2 long ones"),
        format!("SIGTERM, --drain_timeout_s {drain}"),
        tally,
        checks,
    )
}
