//! `llmapi-bench sweep`: the tutorial's bench.sh loop in one command.
//!
//! For each concurrency C it runs the benchmark with `--max-concurrency C --num-prompts
//! C * multi_round`, saving `concurrency_C.json` as bench.sh does, then writes
//! `sweep_summary.csv`, `sweep_summary.md` and the plots next to them.

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::Value;
use tokio::sync::watch;

use crate::app::{self, BenchError};
use crate::args::BenchArgs;
use crate::plot::{self, PlotPoint};
use crate::report::OrderedJson;

/// Flags of the sweep: the benchmark's, plus the concurrency list and rounds.
#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// Comma-separated concurrency levels, e.g. 1,2,4,8,16,32,64,128,256.
    #[arg(long, value_delimiter = ',', required = true)]
    pub concurrency: Vec<usize>,
    /// Prompts per point are concurrency x multi-round.
    #[arg(long, default_value_t = 5)]
    pub multi_round: usize,
    /// Every benchmark flag (--num-prompts and --max-concurrency are set per point).
    #[command(flatten)]
    pub bench: BenchArgs,
}

/// What a sweep wrote.
#[derive(Debug)]
pub struct SweepOutcome {
    /// Results of the points run, with their concurrency.
    pub points: Vec<(usize, OrderedJson)>,
    /// Every file written (JSONs, CSV, Markdown, plots).
    pub files: Vec<PathBuf>,
    /// True when Ctrl-C ended the sweep early.
    pub interrupted: bool,
}

/// Runs every point, then the summaries and plots.
pub async fn sweep(
    args: &SweepArgs,
    stop: watch::Receiver<bool>,
) -> Result<SweepOutcome, BenchError> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        return Err(BenchError::Args(
            "--concurrency needs positive levels, e.g. 1,2,4,8".into(),
        ));
    }
    if args.multi_round == 0 {
        return Err(BenchError::Args("--multi-round must be at least 1".into()));
    }
    let dir = PathBuf::from(args.bench.result_dir.clone().unwrap_or_else(|| ".".into()));
    let mut points = Vec::new();
    let mut files = Vec::new();
    let mut interrupted = false;
    for &c in &args.concurrency {
        let mut point = args.bench.clone();
        point.num_prompts = c * args.multi_round;
        point.max_concurrency = Some(c);
        point.save_result = true;
        point.result_dir = Some(dir.display().to_string());
        point.result_filename = Some(format!("concurrency_{c}.json"));
        println!(
            "=== sweep point: concurrency {c}, {} prompts ===",
            point.num_prompts
        );
        let finished = app::benchmark(&point, stop.clone()).await?;
        files.extend(finished.saved_to.clone());
        points.push((c, finished.result));
        if finished.interrupted {
            interrupted = true;
            break;
        }
    }
    let fail = |path: &Path, source| BenchError::Save {
        path: path.display().to_string(),
        source,
    };
    let csv_path = dir.join("sweep_summary.csv");
    std::fs::write(&csv_path, summary_csv(&points)).map_err(|e| fail(&csv_path, e))?;
    let md_path = dir.join("sweep_summary.md");
    std::fs::write(&md_path, summary_markdown(&points)).map_err(|e| fail(&md_path, e))?;
    files.extend([csv_path, md_path]);
    let plot_points: Vec<PlotPoint> = points.iter().map(|(c, r)| plot_point(*c, r)).collect();
    let plots = plot::draw_sweep(&dir, &plot_points)
        .map_err(|e| fail(Path::new(&e.path), std::io::Error::other(e.detail)))?;
    files.extend(plots);
    Ok(SweepOutcome {
        points,
        files,
        interrupted,
    })
}

fn num(r: &OrderedJson, key: &str) -> f64 {
    r.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// Columns: fixed throughput figures, then every latency statistic the results hold.
fn columns(points: &[(usize, OrderedJson)]) -> Vec<String> {
    let mut cols: Vec<String> = [
        "completed",
        "duration",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "user_throughput",
    ]
    .map(String::from)
    .to_vec();
    if let Some((_, r)) = points.first() {
        cols.extend(
            r.keys()
                .into_iter()
                .filter(|k| k.ends_with("_ms"))
                .map(String::from),
        );
    }
    cols
}

/// One CSV row per point: concurrency, num_prompts and [`columns`].
pub fn summary_csv(points: &[(usize, OrderedJson)]) -> String {
    let cols = columns(points);
    let mut out = format!("concurrency,num_prompts,{}\n", cols.join(","));
    for (c, r) in points {
        let prompts = r.get("num_prompts").and_then(Value::as_u64).unwrap_or(0);
        let values: Vec<String> = cols
            .iter()
            .map(|k| match r.get(k) {
                Some(Value::Number(n)) if n.is_u64() => n.to_string(),
                _ => format!("{:.4}", num(r, k)),
            })
            .collect();
        out.push_str(&format!("{c},{prompts},{}\n", values.join(",")));
    }
    out
}

/// A Markdown table of the headline figures per point.
pub fn summary_markdown(points: &[(usize, OrderedJson)]) -> String {
    let heads = [
        ("request_throughput", "req/s"),
        ("output_throughput", "output tok/s"),
        ("user_throughput", "user tok/s"),
        ("mean_ttft_ms", "mean TTFT ms"),
        ("p99_ttft_ms", "P99 TTFT ms"),
        ("mean_tpot_ms", "mean TPOT ms"),
        ("p99_tpot_ms", "P99 TPOT ms"),
        ("mean_itl_ms", "mean ITL ms"),
        ("mean_e2el_ms", "mean E2EL ms"),
    ];
    let present: Vec<_> = heads
        .iter()
        .filter(|(k, _)| points.iter().any(|(_, r)| r.get(k).is_some()))
        .collect();
    let mut out = String::from("| concurrency | completed |");
    for (_, h) in &present {
        out.push_str(&format!(" {h} |"));
    }
    out.push_str("\n|---:|---:|");
    out.push_str(&"---:|".repeat(present.len()));
    out.push('\n');
    for (c, r) in points {
        let completed = r.get("completed").and_then(Value::as_u64).unwrap_or(0);
        out.push_str(&format!("| {c} | {completed} |"));
        for (k, _) in &present {
            out.push_str(&format!(" {:.2} |", num(r, k)));
        }
        out.push('\n');
    }
    out
}

fn plot_point(c: usize, r: &OrderedJson) -> PlotPoint {
    let mut ttft = vec![
        ("mean".to_string(), num(r, "mean_ttft_ms")),
        ("median".to_string(), num(r, "median_ttft_ms")),
    ];
    for k in r.keys() {
        // P50 is the median, already drawn.
        if let Some(p) = k
            .strip_prefix('p')
            .and_then(|k| k.strip_suffix("_ttft_ms"))
            .filter(|p| *p != "50")
        {
            ttft.push((format!("p{p}"), num(r, k)));
        }
    }
    ttft.retain(|(_, v)| v.is_finite());
    PlotPoint {
        concurrency: c as f64,
        output_throughput: num(r, "output_throughput"),
        mean_tpot_ms: num(r, "mean_tpot_ms").max(0.0),
        ttft_ms: ttft,
    }
}
