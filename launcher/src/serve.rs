//! `llmapi-launch serve` on one machine: the engine, its worker gRPC service on a loopback
//! port, and the embedded OpenAI router on --host/--port, in one process. Ctrl-C or SIGTERM
//! drains the router (in-flight requests finish), then stops the worker and the engine.
//! With `--tp_size N` this process is the group's leader and starts ranks 1..N as child
//! processes of the same binary (`group::LocalRanks`). When the engine fails (its thread
//! panicked, or a rank died), the engine, and for a group every rank, is started again on the
//! same worker address (`restart`, `--max_restarts`); once restarts are used up the server
//! stops and exits with an error naming the failure.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use llmapi_common::args::LlmArgs;
use llmapi_common::model_dir::ModelDir;
use llmapi_proto::auth::RequireToken;
use llmapi_proto::tls::TransportTls;
use llmapi_router::codec::HfCodec;
use llmapi_router::pool::Pool;
use llmapi_router::{AppState, RouterConfig, server};
use llmapi_worker::engine::{Engine, EngineConfig, EngineHandle};
use llmapi_worker::service::{self, WorkerService};
use std::future::Future;
use std::time::Duration;

use crate::group::{self, GroupSpec, LocalRanks};
use crate::restart::{self, RestartPolicy, WorkerSlot};

/// The router settings `serve` derives from `LlmArgs`, over `access`: a configuration holding
/// the access settings of the command line (`AccessArgs::apply`: keys, tokens, metrics port,
/// registration limits).
pub fn router_config(args: &LlmArgs, model: &ModelDir, access: &RouterConfig) -> RouterConfig {
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
        max_inflight_requests: args.max_inflight_requests as usize,
        max_queued_requests: args
            .queue_size
            .map_or(access.max_queued_requests, |n| n as usize),
        queue_timeout: args
            .queue_timeout_secs
            .map_or(access.queue_timeout, std::time::Duration::from_secs),
        ..access.clone()
    }
}

/// A running engine with its worker gRPC service.
pub struct LocalWorker {
    /// The engine.
    pub engine: EngineHandle,
    /// Where the gRPC service listens.
    pub addr: std::net::SocketAddr,
    /// Whether it speaks TLS only (its URL is `https://`).
    pub tls: bool,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl LocalWorker {
    /// Starts the engine on `model` under the name `name` and serves it over gRPC on `bind`
    /// (port 0: any free port) to callers that present `secret` (the job secret). With
    /// `group`, this is the leader of a tensor-parallel group: it joins the group first and
    /// drives its followers. `gpu_slot` is this task's local rank on its node, which picks its
    /// GPU on the CUDA backend, and `replicas_on_node` the replicas that split the node's
    /// host memory (a group carries its own). With `tls` the service speaks TLS only (mutual
    /// TLS when it holds a CA).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        args: &LlmArgs,
        model: &ModelDir,
        name: String,
        bind: &str,
        group: Option<GroupSpec>,
        gpu_slot: usize,
        replicas_on_node: usize,
        secret: &str,
        tls: Option<&TransportTls>,
    ) -> anyhow::Result<Self> {
        let auth = RequireToken::new(secret).context("the job secret")?;
        let server_tls = tls
            .map(TransportTls::grpc_server)
            .transpose()
            .context("the worker's TLS")?;
        let mut engine_cfg = match &group {
            Some(g) => g.engine_config(args),
            None => EngineConfig {
                gpu_slot,
                replicas_on_node: replicas_on_node.max(1),
                ..EngineConfig::from_llm_args(args)
            },
        };
        engine_cfg.model_name = Some(name);
        let model_path = model.path.clone();
        let engine = tokio::task::spawn_blocking(move || match group {
            None => anyhow::Ok(Engine::start(&model_path, engine_cfg)?),
            Some(g) => anyhow::Ok(Engine::start_leader(
                &model_path,
                engine_cfg,
                g.shard()?,
                || g.join(),
            )?),
        })
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
        let grpc = tokio::net::TcpListener::bind(bind).await.with_context(|| {
            format!("binding the worker's gRPC address {bind} (LLMAPI_WORKER_ADDR sets it)")
        })?;
        let addr = grpc
            .local_addr()
            .context("reading the worker's gRPC address")?;
        let ep = args
            .moe_expert_parallel_size
            .unwrap_or(args.tensor_parallel_size);
        let service = WorkerService::new(engine.clone(), args.tensor_parallel_size, ep);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(service::serve(
            service,
            grpc,
            auth,
            server_tls,
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            engine,
            addr,
            tls: tls.is_some(),
            stop,
            task,
        })
    }

    /// The worker's URL at `host`: `https://` when it speaks TLS.
    pub fn url(&self, host: &str) -> String {
        format!("{}://{host}:{}", self.scheme(), self.addr.port())
    }

    /// The worker's URL at the address it listens on.
    pub fn local_url(&self) -> String {
        format!("{}://{}", self.scheme(), self.addr)
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// Stops the gRPC service, then the engine.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        self.engine.shutdown();
    }
}

/// Where the router takes the registrations of a job's other leaders over mutual TLS
/// (`server::admin_app` on its own listener), apart from the HTTP front.
pub struct InternalRegistration {
    /// The bound listener.
    pub listener: tokio::net::TcpListener,
    /// The job's TLS, which must hold a CA (clients must present a certificate it signed).
    pub tls: TransportTls,
}

/// Runs the OpenAI router on --host/--port over `workers` (gRPC URLs) until Ctrl-C / SIGTERM
/// or until `failed` resolves, then drains it. Err when `failed` stopped it (its reason).
/// `worker_tls` reaches `https://` workers; `registration` also serves the job's
/// registrations on an internal TLS listener.
pub async fn run_router(
    args: &LlmArgs,
    model: &ModelDir,
    config: RouterConfig,
    workers: &[String],
    worker_tls: Option<TransportTls>,
    registration: Option<InternalRegistration>,
    failed: impl Future<Output = String> + Send + 'static,
) -> anyhow::Result<()> {
    let tokenizer = args.tokenizer.as_ref().map(PathBuf::from);
    let codec = HfCodec::load(
        &model.path,
        tokenizer.as_deref(),
        args.chat_template.as_deref(),
    )?;
    let mut config = config;
    // Applied by the router, where a request's unset fields are still known; logged once.
    config.sampling_defaults = model
        .generation_config
        .sampling_defaults_for(args.generation_config)?;
    config
        .sampling_defaults
        .log(args.generation_config, &model.path);
    let pool = Arc::new(
        Pool::new(config.worker_token.as_deref())
            .context("the worker token")?
            .with_tls(worker_tls),
    );
    for url in workers {
        pool.add(url)
            .with_context(|| format!("registering the worker {url}"))?;
    }
    pool.check_all(&config.health).await;
    let health = tokio::spawn(pool.clone().health_loop(config.health.clone()));
    let state = Arc::new(AppState::new(config, Arc::new(codec), pool));

    let internal = match registration {
        Some(r) => {
            let addr = r.listener.local_addr().ok();
            let tls = r
                .tls
                .rustls_server()
                .context("the registration listener's TLS")?;
            let task = server::serve_internal(r.listener, tls, server::admin_app(state.clone()))
                .context("serving registrations")?;
            tracing::info!(addr = ?addr, "taking the job's registrations over mutual TLS");
            Some(task)
        }
        None => None,
    };
    let listeners =
        server::Listeners::bind(&args.host, args.port, state.config.metrics_port).await?;
    let addr = format!("{}:{}", args.host, args.port);
    let scheme = if state.config.https.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(
        model = %model.path.display(),
        workers = ?workers,
        "serving at {scheme}://{addr}/v1"
    );
    let reason = Arc::new(std::sync::Mutex::new(None));
    let stop = {
        let reason = Arc::clone(&reason);
        async move {
            tokio::select! {
                () = server::shutdown_signal() => {}
                why = failed => {
                    tracing::error!(reason = %why, "the worker group failed; stopping the server");
                    if let Ok(mut r) = reason.lock() {
                        *r = Some(why);
                    }
                }
            }
        }
    };
    let served = server::serve(listeners, state, stop).await;
    health.abort();
    if let Some(task) = internal {
        task.abort();
    }
    served.context("serving HTTP")?;
    match reason.lock().ok().and_then(|mut r| r.take()) {
        Some(why) => bail!("the worker group failed: {why}"),
        None => Ok(()),
    }
}

/// Runs the engine, the worker service and the router until Ctrl-C / SIGTERM; with
/// `--tp_size N` also ranks 1..N of the group as child processes (group meeting on
/// 127.0.0.1:`rendezvous_port`, or a free port when None). `access` holds the router's access
/// settings (`router_config`). A failed engine (or, in a group, a failed rank: the whole
/// group) is restarted as `restarts` allows (`restart`); Err once a failure is not restarted.
pub async fn run(
    args: LlmArgs,
    model: ModelDir,
    rendezvous_port: Option<u16>,
    access: RouterConfig,
    restarts: RestartPolicy,
    tls: Option<TransportTls>,
) -> anyhow::Result<()> {
    let tp = args.tensor_parallel_size as usize;
    // The worker, the router's calls to it and the group's ranks share this secret; the ranks
    // inherit it through their environment.
    let secret = crate::secret::for_local()?;
    let mut ranks = None;
    let group = if tp > 1 {
        group::check_sizes(&args, &model)?;
        let port = match rendezvous_port {
            Some(p) => p,
            None => llmapi_common::net::free_port(std::net::Ipv4Addr::LOCALHOST.into())
                .context("finding a free port for the group's rendezvous")?,
        };
        let spec = GroupSpec {
            rank: 0,
            size: tp,
            ep_size: group::ep_size(&args),
            group: 0,
            first_task: None,
            rendezvous: format!("127.0.0.1:{port}"),
            // Ranks 1..N are this process's children: nothing outside this machine joins.
            bind: std::net::Ipv4Addr::LOCALHOST.into(),
            token: secret.clone(),
            threads: group::share_of_cores(tp),
            ranks_on_node: tp,
            on_gpu: group::on_gpu(&args),
            gpu_slot: 0,
        };
        ranks = Some(Arc::new(std::sync::Mutex::new(LocalRanks::spawn(&spec)?)));
        Some(spec)
    } else {
        None
    };
    let mut config = router_config(&args, &model, &access);
    config.worker_token = Some(secret.clone());
    // LLMAPI_WORKER_ADDR exposes the worker at a fixed address so that other routers
    // (`llmapi-router --worker_urls` with the same secret as --worker_token_file) can use it
    // too; by default it listens on a loopback port outside the ephemeral range, which a
    // restarted engine binds again (`restart`). Every call needs the secret either way.
    let worker_addr = match std::env::var("LLMAPI_WORKER_ADDR") {
        Ok(addr) => addr,
        Err(_) => {
            let port = llmapi_common::net::free_port(std::net::Ipv4Addr::LOCALHOST.into())
                .context("finding a free port for the worker's gRPC service")?;
            format!("127.0.0.1:{port}")
        }
    };
    let leader = Leader {
        args: args.clone(),
        model: model.clone(),
        name: config.served_model_name.clone(),
        group,
        ranks: ranks.clone(),
        secret,
        tls: tls.clone(),
    };
    let worker = leader.start(&worker_addr).await?;
    let url = worker.local_url();
    let slot: WorkerSlot = Arc::new(tokio::sync::Mutex::new(Some(worker)));
    let leader = Arc::new(leader);
    let starter: restart::Starter = Box::new(move |addr| -> restart::Starting {
        let leader = Arc::clone(&leader);
        Box::pin(async move { leader.restart(addr).await })
    });
    let failed = restart::supervise(Arc::clone(&slot), ranks.clone(), restarts, starter);
    let served = run_router(&args, &model, config, &[url], tls, None, failed).await;
    tracing::info!("router stopped; stopping the worker and the engine");
    // Stopping the engine sends a group's followers Stop; then they exit on their own.
    restart::stop(&slot).await;
    if let Some(ranks) = ranks
        && let Ok(mut ranks) = ranks.lock()
    {
        ranks.stop(Duration::from_secs(10));
    }
    served
}

/// What starts (and restarts) the local worker: its engine, and for a group the ranks too.
struct Leader {
    args: LlmArgs,
    model: ModelDir,
    name: String,
    group: Option<GroupSpec>,
    ranks: Option<Arc<std::sync::Mutex<LocalRanks>>>,
    secret: String,
    /// TLS of the worker's gRPC service (`--tls_*` files), if given.
    tls: Option<TransportTls>,
}

impl Leader {
    /// Starts the engine and its gRPC service on `bind`; a group's ranks must be running.
    async fn start(&self, bind: &str) -> anyhow::Result<LocalWorker> {
        let start = LocalWorker::start(
            &self.args,
            &self.model,
            self.name.clone(),
            bind,
            self.group.clone(),
            0,
            1,
            &self.secret,
            self.tls.as_ref(),
        );
        match &self.ranks {
            None => start.await,
            // A rank that dies while the group forms fails the start now, not at the join
            // timeout.
            Some(r) => tokio::select! {
                w = start => w,
                why = group::rank_exit(Arc::clone(r)) => Err(anyhow::anyhow!("{why} while the group was forming")),
            },
        }
    }

    /// Starts the worker again on `addr` after a failure; a group restarts as a whole: the
    /// old ranks are stopped (killed after a grace) and new ones join the new leader.
    async fn restart(&self, addr: std::net::SocketAddr) -> anyhow::Result<LocalWorker> {
        if let (Some(spec), Some(ranks)) = (&self.group, &self.ranks) {
            let spec = spec.clone();
            let ranks = Arc::clone(ranks);
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let mut ranks = ranks
                    .lock()
                    .map_err(|_| anyhow::anyhow!("the ranks' lock is poisoned"))?;
                ranks.stop(Duration::from_secs(10));
                *ranks = LocalRanks::spawn(&spec)?;
                Ok(())
            })
            .await
            .context("the task restarting the ranks failed")??;
        }
        self.start(&addr.to_string()).await
    }
}
