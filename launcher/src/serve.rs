//! `llmapi-launch serve` on one machine: the engine, its worker gRPC service on a loopback
//! port, and the embedded OpenAI router on --host/--port, in one process. Ctrl-C or SIGTERM
//! drains the router (in-flight requests finish), then stops the worker and the engine.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use llmapi_common::args::LlmArgs;
use llmapi_common::model_dir::ModelDir;
use llmapi_router::codec::HfCodec;
use llmapi_router::pool::Pool;
use llmapi_router::{AppState, RouterConfig, server};
use llmapi_worker::engine::{Engine, EngineConfig, EngineHandle};
use llmapi_worker::service::{self, WorkerService};

/// The router settings `serve` derives from `LlmArgs` (plus LLMAPI_API_KEY /
/// LLMAPI_ADMIN_TOKEN from the environment).
pub fn router_config(args: &LlmArgs, model: &ModelDir) -> RouterConfig {
    let model_path = args
        .model
        .clone()
        .unwrap_or_else(|| model.path.to_string_lossy().into_owned());
    RouterConfig {
        served_model_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| model.default_name()),
        model_path,
        api_key: std::env::var("LLMAPI_API_KEY")
            .ok()
            .filter(|k| !k.is_empty()),
        admin_token: std::env::var("LLMAPI_ADMIN_TOKEN")
            .ok()
            .filter(|k| !k.is_empty()),
        max_inflight_requests: args.max_inflight_requests as usize,
        ..RouterConfig::default()
    }
}

/// A running engine with its worker gRPC service.
pub struct LocalWorker {
    /// The engine.
    pub engine: EngineHandle,
    /// Where the gRPC service listens.
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl LocalWorker {
    /// Starts the engine on `model` under the name `name` and serves it over gRPC on `bind`
    /// (port 0: any free port).
    pub async fn start(
        args: &LlmArgs,
        model: &ModelDir,
        name: String,
        bind: &str,
    ) -> anyhow::Result<Self> {
        let mut engine_cfg = EngineConfig::from_llm_args(args);
        engine_cfg.model_name = Some(name);
        let model_path = model.path.clone();
        let engine = tokio::task::spawn_blocking(move || Engine::start(&model_path, engine_cfg))
            .await
            .context("the engine start-up task failed")?
            .with_context(|| format!("starting the engine on {}", model.path.display()))?;
        let info = engine.info();
        tracing::info!(
            model = %info.model,
            backend = %info.backend,
            max_seq_len = info.max_seq_len,
            kv_blocks = info.kv_capacity_blocks,
            "engine ready"
        );
        let grpc = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("binding the worker's gRPC address {bind}"))?;
        let addr = grpc
            .local_addr()
            .context("reading the worker's gRPC address")?;
        let ep = args
            .moe_expert_parallel_size
            .unwrap_or(args.tensor_parallel_size);
        let service = WorkerService::new(engine.clone(), args.tensor_parallel_size, ep);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(service::serve(service, grpc, async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            engine,
            addr,
            stop,
            task,
        })
    }

    /// Stops the gRPC service, then the engine.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        self.engine.shutdown();
    }
}

/// Runs the OpenAI router on --host/--port over `workers` (gRPC URLs) until Ctrl-C / SIGTERM,
/// then drains it.
pub async fn run_router(
    args: &LlmArgs,
    model: &ModelDir,
    config: RouterConfig,
    workers: &[String],
) -> anyhow::Result<()> {
    let tokenizer = args.tokenizer.as_ref().map(PathBuf::from);
    let codec = HfCodec::load(
        &model.path,
        tokenizer.as_deref(),
        args.chat_template.as_deref(),
    )?;
    let pool = Arc::new(Pool::default());
    for url in workers {
        pool.add(url)
            .with_context(|| format!("registering the worker {url}"))?;
    }
    pool.check_all(&config.health).await;
    let health = tokio::spawn(pool.clone().health_loop(config.health.clone()));
    let state = Arc::new(AppState::new(config, Arc::new(codec), pool));

    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}; pick a free --port or another --host"))?;
    tracing::info!(
        model = %model.path.display(),
        workers = ?workers,
        "serving at http://{addr}/v1"
    );
    let served = server::serve(listener, state, server::shutdown_signal()).await;
    health.abort();
    served.context("serving HTTP")
}

/// Runs the engine, the worker service and the router until Ctrl-C / SIGTERM.
pub async fn run(args: LlmArgs, model: ModelDir) -> anyhow::Result<()> {
    if args.tensor_parallel_size > 1 {
        bail!(
            "tensor_parallel_size {} needs one rank per shard; this single-process serve runs one rank. \
             Use --tp_size 1, or start the ranks with srun/mpirun",
            args.tensor_parallel_size
        );
    }
    let config = router_config(&args, &model);
    // LLMAPI_WORKER_ADDR exposes the worker at a fixed address so that other routers
    // (`llmapi-router --worker_urls`) can use it too; by default it is private to this process.
    let worker_addr =
        std::env::var("LLMAPI_WORKER_ADDR").unwrap_or_else(|_| "127.0.0.1:0".to_owned());
    let worker = LocalWorker::start(
        &args,
        &model,
        config.served_model_name.clone(),
        &worker_addr,
    )
    .await
    .context("(LLMAPI_WORKER_ADDR sets the worker's address)")?;
    let url = format!("http://{}", worker.addr);
    let served = run_router(&args, &model, config, &[url]).await;
    tracing::info!("router stopped; stopping the worker and the engine");
    worker.stop().await;
    served
}
