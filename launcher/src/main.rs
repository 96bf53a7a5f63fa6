//! The `llmapi-launch` binary: `serve`, `env`, `make-model` and `kernels build`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Arg, ArgAction, Args, Command, FromArgMatches};
use llmapi_common::args::{NoticeLevel, Resolved, resolve, serve_command};
use llmapi_common::model_config::ModelConfig;
use llmapi_common::model_dir::ModelDir;
use llmapi_common::telemetry::LogFormat;
use llmapi_common::traces::{self, Service, Tracers};
use llmapi_launch::cluster::{self, ClusterOptions};
use llmapi_launch::group;
use llmapi_launch::kernels;
use llmapi_launch::make_model::{ensure_demo_model, make_draft, make_model};
use llmapi_launch::placement::{DEFAULT_RENDEZVOUS_PORT, Placement, describe};
use llmapi_launch::restart::RestartPolicy;
use llmapi_router::RouterConfig;
use llmapi_router::access::AccessArgs;
use llmapi_router::deadline::DeadlineArgs;
use llmapi_router::front::ConnectionArgs;
use llmapi_router::migrate::MigrationArgs;
use llmapi_router::reasoning::ReasoningArgs;
use llmapi_router::responses::ResponsesArgs;
use llmapi_router::tls::TlsArgs;
use llmapi_router::tools::ToolArgs;

fn cli() -> Command {
    Command::new("llmapi-launch")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Serve LLMs over the OpenAI API on one machine or a Slurm cluster")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(
            TlsArgs::augment_args(MigrationArgs::augment_args(DeadlineArgs::augment_args(
                ConnectionArgs::augment_args(ReasoningArgs::augment_args(ToolArgs::augment_args(
                    ResponsesArgs::augment_args(AccessArgs::augment_args(serve_command())),
                ))),
            )))
                .arg(
                    Arg::new("router_url")
                        .long("router_url")
                        .value_name("URL[,URL...]")
                        .help("Register this worker with external llmapi-routers (one or more, comma separated: it registers with each and renews every third of the router's --worker_lease_s) instead of running the embedded router (give every task LLMAPI_JOB_TOKEN_FILE; the routers' --admin_token and --worker_token_file must hold the same secret)"),
                )
                .arg(
                    Arg::new("rendezvous_port")
                        .long("rendezvous_port")
                        .value_parser(clap::value_parser!(u16))
                        .help(format!(
                            "With --tp_size > 1: base port where each group meets its leader (group g uses base + g) [default: {DEFAULT_RENDEZVOUS_PORT} under Slurm/MPI, a free port locally]"
                        )),
                )
                .arg(
                    Arg::new("max_restarts")
                        .long("max_restarts")
                        .value_parser(clap::value_parser!(u32))
                        .help(format!(
                            "Restarts in a row of a failed engine (a panic in its thread; locally also a dead rank, restarting the whole group) before the launcher exits non-zero; waits 1 s doubling to 30 s before each, and 10 minutes of service clears the count (0: never restart) [default: {}]",
                            RestartPolicy::default().max_restarts
                        )),
                )
                .arg(
                    Arg::new("bootstrap_port")
                        .long("bootstrap_port")
                        .value_parser(clap::value_parser!(u16))
                        .help("Port on rank 0's node where the other ranks fetch the job secret over MUNGE (when no LLMAPI_JOB_TOKEN / LLMAPI_JOB_TOKEN_FILE is set) [default: --rendezvous_port - 1]"),
                )
                .arg(
                    Arg::new("registration_port")
                        .long("registration_port")
                        .value_parser(clap::value_parser!(u16))
                        .help("Port on rank 0's node where the job's other group leaders register their workers over mutual TLS [default: --port + 1]"),
                ),
        )
        .subcommand(
            Command::new("env")
                .about(
                    "Print where this process sits in a Slurm/MPI job and its group role, as JSON",
                )
                .arg(
                    Arg::new("tp_size")
                        .long("tp_size")
                        .visible_alias("tensor_parallel_size")
                        .value_parser(clap::value_parser!(usize))
                        .default_value("1")
                        .help("Ranks per model replica"),
                )
                .arg(
                    Arg::new("rendezvous_port")
                        .long("rendezvous_port")
                        .value_parser(clap::value_parser!(u16))
                        .help(format!(
                            "Base port where each group meets its leader (group g uses base + g) [default: {DEFAULT_RENDEZVOUS_PORT}]"
                        )),
                ),
        )
        .subcommand(
            Command::new("make-model")
                .about("Write a built-in random-weight checkpoint in Hugging Face layout, or a draft model cut from a checkpoint (--from)")
                .arg(
                    Arg::new("preset")
                        .long("preset")
                        .value_parser(["demo", "bench"])
                        .required_unless_present("from")
                        .conflicts_with("from")
                        .help("demo: tiny, for tests; bench: Llama-3 style, 124M parameters"),
                )
                .arg(
                    Arg::new("from")
                        .long("from")
                        .value_name("DIR")
                        .requires("num_layers")
                        .help("Cut a draft model (speculative decoding's DraftTarget) from the checkpoint in DIR: its first --num_layers layers, embeddings, final norm, head and tokenizer"),
                )
                .arg(
                    Arg::new("num_layers")
                        .long("num_layers")
                        .value_name("N")
                        .requires("from")
                        .value_parser(clap::value_parser!(usize))
                        .help("Decoder layers to keep with --from"),
                )
                .arg(
                    Arg::new("out")
                        .long("out")
                        .required(true)
                        .value_name("DIR")
                        .help("Directory to write"),
                )
                .arg(
                    Arg::new("force")
                        .long("force")
                        .action(ArgAction::SetTrue)
                        .help("Overwrite a model already in DIR"),
                ),
        )
        .subcommand(
            Command::new("kernels")
                .about("The CUDA kernel cache")
                .subcommand_required(true)
                .arg_required_else_help(true)
                .subcommand(
                    Command::new("build")
                        .about("Compile the CUDA kernels to machine code with this machine's NVRTC, into a cache a GPU machine without NVRTC loads (LLMAPI_KERNEL_CACHE)")
                        .arg(
                            Arg::new("arch")
                                .long("arch")
                                .value_name("sm_XY")
                                .action(ArgAction::Append)
                                .value_delimiter(',')
                                .default_value(kernels::DEFAULT_ARCHS)
                                .help("GPU architectures to build, repeated or comma-separated: sm_90 (H100/H200), sm_80 (A100), sm_89 (L4/L40), sm_120 (RTX 50xx)"),
                        )
                        .arg(
                            Arg::new("out")
                                .long("out")
                                .value_name("DIR")
                                .help("Cache directory to write (kept files of other architectures stay listed) [default: $LLMAPI_KERNEL_CACHE, else ~/.cache/llmapi/kernels]"),
                        ),
                ),
        )
}

fn main() -> ExitCode {
    let matches = cli().get_matches();
    let result = match matches.subcommand() {
        Some(("serve", m)) => serve(m),
        Some(("env", m)) => print_env(m),
        Some(("make-model", m)) => {
            llmapi_common::telemetry::init_logging(
                "info",
                LogFormat::resolve(None).unwrap_or_default(),
            );
            let out = PathBuf::from(m.get_one::<String>("out").cloned().unwrap_or_default());
            match (
                m.get_one::<String>("from"),
                m.get_one::<usize>("num_layers"),
            ) {
                (Some(from), Some(&layers)) => {
                    make_draft(&PathBuf::from(from), layers, &out, m.get_flag("force"))
                }
                _ => {
                    let preset = m
                        .get_one::<String>("preset")
                        .map(String::as_str)
                        .unwrap_or("demo");
                    make_model(preset, &out, m.get_flag("force"))
                }
            }
        }
        Some(("kernels", k)) => match k.subcommand() {
            Some(("build", b)) => build_kernels(b),
            _ => Ok(()),
        },
        _ => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn build_kernels(m: &clap::ArgMatches) -> anyhow::Result<()> {
    llmapi_common::telemetry::init_logging("warning", LogFormat::resolve(None).unwrap_or_default());
    let archs: Vec<String> = m
        .get_many::<String>("arch")
        .map(|v| v.cloned().collect())
        .unwrap_or_default();
    let out = match m.get_one::<String>("out") {
        Some(d) => PathBuf::from(d),
        None => llmapi_worker::backend::cuda::kernel_cache_dir().context(
            "no default kernel cache directory (neither LLMAPI_KERNEL_CACHE, XDG_CACHE_HOME nor HOME is set); pass --out DIR",
        )?,
    };
    kernels::build(&out, &archs)
}

fn serve(m: &clap::ArgMatches) -> anyhow::Result<()> {
    let resolved = resolve(m)?;
    let args = &resolved.args;
    let log_format = LogFormat::resolve(args.log_format).map_err(anyhow::Error::msg)?;
    // The embedded router's and worker's spans, each under its own service.name. A bad trace
    // endpoint is refused here, before any rank starts or any weight loads.
    let endpoint = traces::endpoint(args.otlp_traces_endpoint.as_deref());
    let tracers = Tracers::new(endpoint.as_deref(), &[Service::Router, Service::Worker])
        .context("--otlp_traces_endpoint")?;
    llmapi_common::telemetry::init_logging_with(&args.log_level, log_format, &tracers);
    if let Some(endpoint) = tracers.endpoint() {
        tracing::info!(endpoint, "exporting request spans over OTLP/gRPC");
    }
    let result = serve_with(m, resolved);
    // The last spans are sent (at most traces::SHUTDOWN_TIMEOUT a service) before exit.
    tracers.shutdown();
    result
}

/// `serve` once logging and tracing are set up.
fn serve_with(m: &clap::ArgMatches, resolved: Resolved) -> anyhow::Result<()> {
    let mut args = resolved.args;
    for n in &resolved.notices {
        match n.level {
            NoticeLevel::Info => tracing::info!("{}", n.message),
            NoticeLevel::Warn => tracing::warn!("{}", n.message),
        }
    }
    let model_path = match &args.model {
        Some(p) => PathBuf::from(p),
        None => {
            let dir = ensure_demo_model()?;
            tracing::info!(path = %dir.display(), "no MODEL given: serving the built-in demo model");
            args.model = Some(dir.to_string_lossy().into_owned());
            dir
        }
    };
    let model = ModelDir::open(&model_path)?;
    args.resolve_max_seq_len(model.max_position_embeddings)
        .with_context(|| format!("model {}", model_path.display()))?;
    if resolved.print_config {
        print!("{}", args.to_yaml());
        return Ok(());
    }
    // config.json values the engine does not implement (docs/models.md) are refused before
    // any rank starts or any weight loads.
    let config = ModelConfig::from_model_dir(&model.path)
        .with_context(|| format!("model {}", model_path.display()))?;
    if let Some(n) = args.max_seq_len
        && args.backend == llmapi_common::args::Backend::Cuda
        && let Err(why) = config.check_full_attention_covers("cuda", n as usize)
    {
        anyhow::bail!("model {}: {why}", model_path.display());
    }
    if let Some(spec) = group::spawned_rank(&args)? {
        // A rank started by a local `serve --tp_size N`: follow its leader, nothing else.
        group::exit_with_parent();
        return group::run_follower(&args, &model, &spec);
    }
    // The embedded router's keys: read once here, after the spawned-rank exit above (a local
    // group's ranks run no router).
    let mut router = RouterConfig::default();
    let access = AccessArgs::from_arg_matches(m)?;
    for warning in access.apply(m, args.port, &mut router)? {
        tracing::warn!("{warning}");
    }
    router.front = ConnectionArgs::from_arg_matches(m)?.limits();
    DeadlineArgs::from_arg_matches(m)?.apply(&mut router);
    router.max_migrations = MigrationArgs::from_arg_matches(m)?.max_migrations;
    router.reasoning_parser = ReasoningArgs::from_arg_matches(m)?.reasoning_parser;
    router.tool_parser = ToolArgs::from_arg_matches(m)?.tool_parser;
    router.responses_store = ResponsesArgs::from_arg_matches(m)?.limits();
    let tls = TlsArgs::from_arg_matches(m)?;
    // Certificate files are read and checked before anything starts.
    router.https = tls.https_front()?;
    let tls_files = tls.files();
    let local_tls = if tls_files.is_empty() {
        None
    } else {
        Some(tls_files.load()?)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let router_url = m.get_one::<String>("router_url").cloned();
    let rendezvous_port = m.get_one::<u16>("rendezvous_port").copied();
    let placement = Placement::from_env(std::env::vars())?;
    let base = rendezvous_port.unwrap_or(DEFAULT_RENDEZVOUS_PORT);
    let restarts = RestartPolicy {
        max_restarts: m
            .get_one::<u32>("max_restarts")
            .copied()
            .unwrap_or(RestartPolicy::default().max_restarts),
    };
    let opts = ClusterOptions {
        router_url: router_url.clone(),
        rendezvous_port: base,
        bootstrap_port: m
            .get_one::<u16>("bootstrap_port")
            .copied()
            .unwrap_or(base.saturating_sub(1)),
        registration_port: m
            .get_one::<u16>("registration_port")
            .copied()
            .unwrap_or(args.port.saturating_add(1)),
        router: router.clone(),
        restarts,
        tls: tls_files,
    };
    let result = match placement {
        Some(p) if p.world_size > 1 || router_url.is_some() => {
            tracing::info!(rank = p.rank, world_size = p.world_size, launcher = ?p.launcher, "serving as one task of a job");
            runtime.block_on(cluster::run(args, model, p, opts))
        }
        None if router_url.is_some() => {
            runtime.block_on(cluster::run(args, model, Placement::local(), opts))
        }
        _ => runtime.block_on(llmapi_launch::serve::run(
            args,
            model,
            rendezvous_port,
            router,
            restarts,
            local_tls,
        )),
    };
    // A failed start can leave a blocking task behind (a group join waiting for a rank that
    // died); dropping the runtime would wait for it, so give such tasks a bounded moment.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

fn print_env(m: &clap::ArgMatches) -> anyhow::Result<()> {
    let placement = Placement::from_env(std::env::vars())?.unwrap_or_else(Placement::local);
    let tp_size = m.get_one::<usize>("tp_size").copied().unwrap_or(1);
    let port = m
        .get_one::<u16>("rendezvous_port")
        .copied()
        .unwrap_or(DEFAULT_RENDEZVOUS_PORT);
    println!("{}", describe(&placement, tp_size, port)?);
    Ok(())
}
