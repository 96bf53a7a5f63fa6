//! Command-line arguments: benchmark_serving.py's flags with the same names and defaults, plus a
//! few of our own (timeouts, /metrics sampling) that the original lacks.
//!
//! Validation that clap cannot express (percentile metric names, goodput pairs, ranges) lives in
//! [`BenchArgs::validate`], which returns messages that say what to change.

use clap::{Args, ValueEnum};

use crate::metrics::Goodput;

/// The request format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// `/v1/completions` with a prompt string (or token ids).
    Openai,
    /// `/v1/chat/completions` with one user message.
    #[value(name = "openai-chat")]
    OpenaiChat,
}

impl Backend {
    /// The name the original writes into the result JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Openai => "openai",
            Backend::OpenaiChat => "openai-chat",
        }
    }
}

/// Where prompts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatasetName {
    /// ShareGPT conversations (a JSON file given with --dataset-path).
    Sharegpt,
    /// Synthetic prompts of --random-input-len tokens.
    Random,
    /// JSON lines of `{"input": {"messages": [...], "max_tokens": N}}`.
    #[value(alias = "trtllm_custom")]
    Custom,
}

/// Every flag of one benchmark run.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Request format.
    #[arg(long, value_enum, default_value = "openai")]
    pub backend: Backend,
    /// Server or API base URL if not using --host and --port.
    #[arg(long)]
    pub base_url: Option<String>,
    /// Server host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Server port.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// API endpoint (openai-chat always uses /v1/chat/completions).
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,
    /// Dataset to sample prompts from.
    #[arg(long, value_enum, default_value = "sharegpt")]
    pub dataset_name: DatasetName,
    /// Path of the ShareGPT JSON or custom JSONL file (optional for random).
    #[arg(long)]
    pub dataset_path: Option<String>,
    /// Maximum number of requests in flight; unlimited when absent.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Model name, and the tokenizer directory unless --tokenizer is given.
    #[arg(long)]
    pub model: String,
    /// Tokenizer directory or tokenizer.json file, if not the model's.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Accepted for compatibility; beam search is not benchmarked.
    #[arg(long)]
    pub use_beam_search: bool,
    /// Number of prompts to send.
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,
    /// Logprobs per token to request.
    #[arg(long)]
    pub logprobs: Option<u32>,
    /// Requests per second (Poisson or gamma arrivals); inf sends everything at time 0.
    #[arg(long, default_value_t = f64::INFINITY)]
    pub request_rate: f64,
    /// Gamma shape of the arrivals: 1 is Poisson, lower is burstier, higher more uniform.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Send non-streaming requests (TTFT is then -1 and ITL empty).
    #[arg(long)]
    pub non_streaming: bool,
    /// Seed for dataset sampling and arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Accepted for compatibility; no remote code exists here.
    #[arg(long)]
    pub trust_remote_code: bool,
    /// Disable the progress bar.
    #[arg(long)]
    pub disable_tqdm: bool,
    /// Save the result as JSON.
    #[arg(long)]
    pub save_result: bool,
    /// Include per-request lists (lens, ttfts, itls, e2els, texts, errors) in the JSON.
    #[arg(long)]
    pub save_detailed: bool,
    /// KEY=VALUE pairs saved in the result JSON.
    #[arg(long, value_name = "KEY=VALUE", num_args = 0..)]
    pub metadata: Vec<String>,
    /// Directory for the result JSON (default: current directory).
    #[arg(long)]
    pub result_dir: Option<String>,
    /// File name of the result JSON.
    #[arg(long)]
    pub result_filename: Option<String>,
    /// Ask the server to ignore EOS so every request generates its full output length.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Comma-separated metrics to report: ttft, tpot, itl, e2el.
    #[arg(long, default_value = "ttft,tpot,itl")]
    pub percentile_metrics: String,
    /// Comma-separated percentiles of those metrics.
    #[arg(long, default_value = "99")]
    pub metric_percentiles: String,
    /// SLOs as KEY:VALUE in ms (ttft, tpot, e2el) for goodput.
    #[arg(long, num_args = 1..)]
    pub goodput: Vec<String>,
    /// Output length per ShareGPT request, overriding the dataset's.
    #[arg(long)]
    pub sharegpt_output_len: Option<u32>,
    /// Input tokens per request (random dataset).
    #[arg(long, default_value_t = 1024)]
    pub random_input_len: u32,
    /// Output tokens per request (random dataset).
    #[arg(long, default_value_t = 128)]
    pub random_output_len: u32,
    /// Lengths are drawn from [len * (1 - r), len * (1 + r)]; r in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// Fixed prefix tokens before the random part of every prompt.
    #[arg(long, default_value_t = 0)]
    pub random_prefix_len: u32,
    /// Distinct prefixes of --random-prefix-len tokens; each prompt starts with one drawn at
    /// random (a shared-prefix workload: a few long system prompts, many questions).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub random_num_prefixes: u32,
    /// Generate random token ids even when --dataset-path is given.
    #[arg(long)]
    pub random_ids: bool,
    /// Send token ids instead of text so the server sees exactly the requested input length.
    #[arg(long)]
    pub tokenize_on_client: bool,
    /// Top-p sampling parameter.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Top-k sampling parameter.
    #[arg(long)]
    pub top_k: Option<i64>,
    /// Min-p sampling parameter.
    #[arg(long)]
    pub min_p: Option<f64>,
    /// Temperature (greedy, 0.0, when absent).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Accepted for compatibility; tokenizers load from tokenizer.json.
    #[arg(long, default_value = "auto")]
    pub tokenizer_mode: String,
    /// Model name in the API, if not --model.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Skip the initial single-prompt test request.
    #[arg(long)]
    pub no_test_input: bool,
    /// Fail a request that takes longer than this many seconds in total (llmapi-bench).
    #[arg(long, default_value_t = 6.0 * 3600.0)]
    pub request_timeout: f64,
    /// Fail a request whose stream sends nothing for this many seconds (llmapi-bench).
    #[arg(long)]
    pub chunk_timeout: Option<f64>,
    /// Sample the server's /metrics every this many seconds; 0 disables (llmapi-bench).
    #[arg(long, default_value_t = 1.0)]
    pub metrics_interval: f64,
}

/// The four metrics that can be reported with percentiles.
pub const PERCENTILE_METRICS: [&str; 4] = ["ttft", "tpot", "itl", "e2el"];

impl BenchArgs {
    /// Checks what clap cannot and returns the parsed metric list, percentiles and SLOs.
    pub fn validate(&self) -> Result<(Vec<String>, Vec<f64>, Goodput), String> {
        let metrics: Vec<String> = self
            .percentile_metrics
            .split(',')
            .map(|m| m.trim().to_string())
            .collect();
        if let Some(bad) = metrics
            .iter()
            .find(|m| !PERCENTILE_METRICS.contains(&m.as_str()))
        {
            return Err(format!(
                "--percentile-metrics has unknown metric '{bad}'; allowed: ttft, tpot, itl, e2el"
            ));
        }
        let mut percentiles = Vec::new();
        for p in self.metric_percentiles.split(',') {
            match p.trim().parse::<f64>() {
                Ok(v) if (0.0..=100.0).contains(&v) => percentiles.push(v),
                _ => {
                    return Err(format!(
                        "--metric-percentiles has '{p}', which is not a number in 0..=100; \
                         use e.g. 50,90,99"
                    ));
                }
            }
        }
        let goodput = parse_goodput(&self.goodput)?;
        if self.num_prompts == 0 {
            return Err("--num-prompts is 0; send at least one prompt".into());
        }
        if self.max_concurrency == Some(0) {
            return Err("--max-concurrency is 0; give at least 1 or leave it out".into());
        }
        if self.request_rate.is_nan() || self.request_rate <= 0.0 {
            return Err(format!(
                "--request-rate is {}; give a positive rate or inf",
                self.request_rate
            ));
        }
        if self.burstiness.is_nan() || self.burstiness <= 0.0 {
            return Err(format!(
                "--burstiness is {}; a positive factor is expected (1 = Poisson)",
                self.burstiness
            ));
        }
        if !(0.0..1.0).contains(&self.random_range_ratio) {
            return Err(format!(
                "--random-range-ratio is {}; it must be in [0, 1)",
                self.random_range_ratio
            ));
        }
        if self.request_timeout.is_nan() || self.request_timeout <= 0.0 {
            return Err("--request-timeout must be a positive number of seconds".into());
        }
        if self.chunk_timeout.is_some_and(|t| t.is_nan() || t <= 0.0) {
            return Err("--chunk-timeout must be a positive number of seconds".into());
        }
        for item in &self.metadata {
            if !item.contains('=') {
                return Err(format!(
                    "--metadata item '{item}' is not KEY=VALUE; e.g. --metadata version=0.3.3 tp=1"
                ));
            }
        }
        Ok((metrics, percentiles, goodput))
    }

    /// The model name sent in requests.
    pub fn request_model(&self) -> &str {
        self.served_model_name.as_deref().unwrap_or(&self.model)
    }

    /// The tokenizer location: --tokenizer, else --model.
    pub fn tokenizer_id(&self) -> &str {
        self.tokenizer.as_deref().unwrap_or(&self.model)
    }

    /// `(api_url, base_url)` as the original derives them.
    pub fn urls(&self) -> (String, String) {
        let endpoint = match self.backend {
            Backend::OpenaiChat => "/v1/chat/completions",
            Backend::Openai => self.endpoint.as_str(),
        };
        let base = match &self.base_url {
            Some(b) => b.trim_end_matches('/').to_string(),
            None => format!("http://{}:{}", self.host, self.port),
        };
        (format!("{base}{endpoint}"), base)
    }
}

/// Parses `KEY:VALUE` SLO pairs (milliseconds) for --goodput.
pub fn parse_goodput(pairs: &[String]) -> Result<Goodput, String> {
    let mut g = Goodput::default();
    for pair in pairs {
        let parsed = pair
            .split_once(':')
            .and_then(|(k, v)| v.trim().parse::<f64>().ok().map(|v| (k.trim(), v)));
        let Some((name, value)) = parsed else {
            return Err(format!(
                "--goodput '{pair}' is not KEY:VALUE; specify SLOs as e.g. ttft:200 tpot:50 \
                 (milliseconds)"
            ));
        };
        if value < 0.0 {
            return Err(format!(
                "--goodput {name}:{value} is negative; SLO values must be non-negative"
            ));
        }
        match name {
            "ttft" => g.ttft_ms = Some(value),
            "tpot" => g.tpot_ms = Some(value),
            "e2el" => g.e2el_ms = Some(value),
            other => {
                return Err(format!(
                    "--goodput metric '{other}' is unknown; use ttft, tpot or e2el"
                ));
            }
        }
    }
    Ok(g)
}
