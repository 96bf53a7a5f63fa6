//! `llmapi-router`: the OpenAI router alone, in front of workers given by --worker_urls or
//! registering through POST /workers.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use llmapi_common::generation_config::GenerationConfig;
use llmapi_common::traces::{self, Service, Tracers};
use llmapi_router::args::RouterArgs;
use llmapi_router::codec::HfCodec;
use llmapi_router::discovery::Discovery;
use llmapi_router::pool::Pool;
use llmapi_router::{AppState, server};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let matches = RouterArgs::command().get_matches();
    let args = RouterArgs::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let endpoint = traces::endpoint(args.otlp_traces_endpoint.as_deref());
    let tracers =
        Tracers::new(endpoint.as_deref(), &[Service::Router]).context("--otlp_traces_endpoint")?;
    args.log
        .init_with("info", &tracers)
        .map_err(anyhow::Error::msg)?;
    if let Some(endpoint) = tracers.endpoint() {
        tracing::info!(endpoint, "exporting request spans over OTLP/gRPC");
    }
    let mut config = args.config();
    config.worker_token = args.worker_token()?;
    if config.worker_token.is_none() {
        tracing::warn!(
            "no --worker_token_file or LLMAPI_WORKER_TOKEN: calls to workers carry no token, and workers started by llmapi-launch refuse them"
        );
    }
    for warning in args.access.apply(&matches, args.port, &mut config)? {
        tracing::warn!("{warning}");
    }
    config.https = args.tls.https_front()?;
    let worker_tls = args.worker_tls(config.worker_token.as_deref())?;
    let generation = GenerationConfig::read(&args.model)?;
    config.sampling_defaults = generation.sampling_defaults_for(args.generation_config)?;
    config
        .sampling_defaults
        .log(args.generation_config, &args.model);
    let codec = HfCodec::load(
        &args.model,
        args.tokenizer.as_deref(),
        args.chat_template.as_deref(),
    )?;
    let pool = Arc::new(
        Pool::new(config.worker_token.as_deref())
            .context("--worker_token_file / LLMAPI_WORKER_TOKEN")?
            .with_tls(worker_tls),
    );
    for url in &args.worker_urls {
        pool.add(url)
            .with_context(|| format!("--worker_urls {url}"))?;
    }
    if let Some(source) = &args.worker_discovery {
        let discovery = Discovery::new(
            source.clone(),
            args.worker_discovery_nameserver,
            Duration::from_secs(args.worker_discovery_interval_s.max(1)),
            config.registration.max_workers,
        )
        .map_err(anyhow::Error::msg)
        .context("--worker_discovery")?;
        tracing::info!(name = %source.name, port = source.port, "following the DNS records of the workers");
        tokio::spawn(discovery.run(pool.clone()));
    } else if args.worker_urls.is_empty() {
        tracing::warn!("no --worker_urls given; waiting for workers to register at POST /workers");
    }
    pool.check_all(&config.health).await;
    tokio::spawn(pool.clone().health_loop(config.health.clone()));
    let state = Arc::new(AppState::new(config, Arc::new(codec), pool));
    let listeners =
        server::Listeners::bind(&args.host, args.port, state.config.metrics_port).await?;
    let scheme = if state.config.https.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(host = %args.host, port = args.port, scheme, "llmapi-router listening");
    let served = server::serve(listeners, state, server::shutdown_signal()).await;
    // The last spans are sent (at most traces::SHUTDOWN_TIMEOUT) before the process exits.
    let _ = tokio::task::spawn_blocking(move || tracers.shutdown()).await;
    served.context("serving HTTP")
}
