//! A whole benchmark invocation: validate flags, load the tokenizer, sample prompts, run, print
//! the report and save the result JSON where the original would.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::watch;

use crate::args::{BenchArgs, DatasetName};
use crate::client::{Endpoint, EndpointError};
use crate::dataset::{self, DatasetError};
use crate::metrics::calculate_metrics;
use crate::report::{self, OrderedJson, RunFacts};
use crate::runner::{self, RunError};
use crate::tokenizer::{self, CodecCounter};

/// Why a benchmark could not run or finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag value is invalid.
    #[error("{0}")]
    Args(String),
    /// The tokenizer could not be loaded.
    #[error("{0}")]
    Tokenizer(String),
    /// The dataset could not be sampled.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// The server URL is unusable.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The run could not start.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The result file could not be written.
    #[error("cannot write {path}: {source}; check --result-dir")]
    Save {
        /// File being written.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// What a finished (or interrupted) benchmark left.
#[derive(Debug)]
pub struct Finished {
    /// The full result, as saved with --save-result --save-detailed.
    pub result: OrderedJson,
    /// The JSON file written, with --save-result.
    pub saved_to: Option<PathBuf>,
    /// True when Ctrl-C cut the run short.
    pub interrupted: bool,
}

/// `YYYYmmdd-HHMMSS` in UTC, the original's `current_dt` format.
pub fn timestamp_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Runs one benchmark as benchmark_serving.py's `main` does. `stop` turning true (Ctrl-C) ends
/// the run early; the partial result is still printed and saved.
pub async fn benchmark(
    args: &BenchArgs,
    stop: watch::Receiver<bool>,
) -> Result<Finished, BenchError> {
    let (selected, percentiles, goodput) = args.validate().map_err(BenchError::Args)?;
    let tok = tokenizer::load(args.tokenizer_id()).map_err(BenchError::Tokenizer)?;
    let requests = dataset::sample(args, &tok)?;
    if args.dataset_name == DatasetName::Random {
        println!("{}", dataset::input_length_line(args, &requests));
    }
    let (api_url, base_url) = args.urls();
    let endpoint = Arc::new(Endpoint::resolve(&api_url).await?);
    let metrics_endpoint = Endpoint::resolve(&format!("{base_url}/metrics")).await.ok();

    let outcome = runner::run(args, &requests, endpoint, metrics_endpoint, stop).await?;
    if outcome.interrupted {
        println!(
            "Interrupted by Ctrl-C: {} of {} requests finished; partial result follows.",
            outcome.outputs.len(),
            requests.len()
        );
    }
    let counter = CodecCounter(&tok);
    let (m, output_lens) = calculate_metrics(
        &outcome.outputs,
        outcome.duration,
        &counter,
        &percentiles,
        &goodput,
    );
    print!("{}", report::error_lines(&m));
    if m.completed == 0 {
        eprintln!(
            "warning: All requests failed. This is likely due to a misconfiguration on the \
             benchmark arguments."
        );
    }
    let facts = RunFacts {
        duration: outcome.duration,
        outputs: &outcome.outputs,
        output_lens: &output_lens,
        selected: &selected,
        has_goodput: !goodput.is_empty(),
    };
    let (block, bench_result) = report::render(&m, &facts);
    print!("{block}");

    let current_dt = timestamp_now();
    let mut result = OrderedJson::default();
    result.insert("date", json!(current_dt));
    result.insert("backend", json!(args.backend.as_str()));
    result.insert("model_id", json!(args.model));
    result.insert("tokenizer_id", json!(args.tokenizer_id()));
    result.insert("num_prompts", json!(args.num_prompts));
    for item in &args.metadata {
        if let Some((k, v)) = item.split_once('=') {
            result.insert(k.trim(), json!(v.trim()));
        }
    }
    for (k, v) in bench_result.0 {
        result.insert(k, v);
    }
    let rate = if args.request_rate.is_finite() {
        json!(args.request_rate)
    } else {
        json!("inf")
    };
    result.insert("request_rate", rate);
    result.insert("burstiness", json!(args.burstiness));
    result.insert("max_concurrency", json!(args.max_concurrency));
    let sampled = runner::server_metrics_json(&outcome.server_metrics, args.metrics_interval);
    if !sampled.is_null() {
        result.insert("server_metrics", sampled);
    }
    if outcome.interrupted {
        result.insert("interrupted", json!(true));
    }

    let saved_to = if args.save_result {
        let mut saved = result.clone();
        if !args.save_detailed {
            for f in report::DETAILED_FIELDS {
                saved.remove(f);
            }
        }
        Some(save(args, &current_dt, &saved)?)
    } else {
        None
    };
    Ok(Finished {
        result,
        saved_to,
        interrupted: outcome.interrupted,
    })
}

/// The original's default file name: `{backend}-{rate}qps[-concurrencyN]-{model}-{dt}.json`.
pub fn default_file_name(args: &BenchArgs, current_dt: &str) -> String {
    let base_model_id = args.model.rsplit('/').next().unwrap_or(&args.model);
    let conc = args
        .max_concurrency
        .map_or(String::new(), |c| format!("-concurrency{c}"));
    format!(
        "{}-{}qps{conc}-{base_model_id}-{current_dt}.json",
        args.backend.as_str(),
        report::py_float(args.request_rate)
    )
}

fn save(args: &BenchArgs, current_dt: &str, result: &OrderedJson) -> Result<PathBuf, BenchError> {
    let name = args
        .result_filename
        .clone()
        .unwrap_or_else(|| default_file_name(args, current_dt));
    let path = match &args.result_dir {
        Some(dir) => Path::new(dir).join(name),
        None => PathBuf::from(name),
    };
    let fail = |source| BenchError::Save {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    let text = serde_json::to_string(result).map_err(|e| fail(std::io::Error::other(e)))?;
    std::fs::write(&path, text).map_err(fail)?;
    Ok(path)
}
