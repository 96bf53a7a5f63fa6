//! `llmapi-launch serve` as one task of a Slurm or MPI job.
//!
//! The job's tasks form groups of `--tp_size` consecutive ranks; each group is one model
//! replica. Its leader (first rank) runs the engine's scheduler and the worker gRPC service on
//! a port of its node, the other ranks of the group join it at the leader's node on
//! `--rendezvous_port` + group index and run their shard of every step. Rank 0 also runs the
//! OpenAI router; the other leaders register their worker with it (POST /workers,
//! authenticated by the job secret, `secret`) and renew the registration as a heartbeat. Every
//! worker's gRPC service requires the job secret too; when all the job's tasks share one node
//! it listens on 127.0.0.1 only. With
//! `--router_url URL[,URL...]` every leader registers with those external routers instead
//! (`register`) and no task runs one. A single-rank worker whose engine fails is restarted in place on the same address
//! (`restart`, `--max_restarts`): the router's health checks re-admit it and its heartbeat
//! keeps it registered. When a rank of a group dies, its leader fails the group's requests and
//! exits with an error naming the rank (the router's own health checks drop the worker); such
//! a group is not restarted by the launcher.
//!
//! Traffic between tasks is TLS: every worker serves gRPC over mutual TLS and the other
//! leaders register with rank 0's router over an internal mutual-TLS listener
//! (`--registration_port`), never over the HTTP front. The certificates are the
//! `--tls_cert_file/--tls_key_file/--tls_ca_file` given, or else each task's own leaf of the
//! job CA every task derives from the job secret (`llmapi_proto::tls::JobCa`).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use anyhow::{Context, bail};
use llmapi_common::args::LlmArgs;
use llmapi_common::model_dir::ModelDir;
use llmapi_proto::tls::{JobCa, TlsFiles, TransportTls};
use llmapi_router::RouterConfig;
use llmapi_router::auth::Secret;

use crate::group::{self, GroupSpec};
use crate::placement::{DEFAULT_RENDEZVOUS_PORT, GroupRole, Placement};
use crate::register::{self, RegistrationTarget};
use crate::restart::{self, RestartPolicy, WorkerSlot};
use crate::serve::{InternalRegistration, LocalWorker};

/// Options of a job task that are not LlmArgs keys.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// External routers to register with (`--router_url URL[,URL...]`); none: rank 0 runs
    /// the router.
    pub router_url: Option<String>,
    /// Group g meets its leader on this port + g.
    pub rendezvous_port: u16,
    /// Rank 0 hands the job secret to the other ranks on this port (MUNGE exchange).
    pub bootstrap_port: u16,
    /// Rank 0 takes the other leaders' registrations over mutual TLS on this port.
    pub registration_port: u16,
    /// The embedded router's access settings (keys, registration limits; `serve::router_config`).
    pub router: RouterConfig,
    /// How a leader restarts its failed engine (groups of several ranks are not restarted).
    pub restarts: RestartPolicy,
    /// `--tls_cert_file/--tls_key_file/--tls_ca_file`; none given: the job CA's certificates.
    pub tls: TlsFiles,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            router_url: None,
            rendezvous_port: DEFAULT_RENDEZVOUS_PORT,
            bootstrap_port: DEFAULT_RENDEZVOUS_PORT - 1,
            // The default --port (8000) + 1.
            registration_port: 8001,
            router: RouterConfig::default(),
            restarts: RestartPolicy::default(),
            tls: TlsFiles::default(),
        }
    }
}

/// Whether every task of the job runs on this one node (and no external router needs to
/// reach its worker): then workers listen on loopback only.
fn on_one_node(p: &Placement, opts: &ClusterOptions) -> bool {
    if opts.router_url.is_some() {
        return false;
    }
    let advertised = std::env::var("LLMAPI_ADVERTISE_HOST").ok();
    match advertised.as_deref() {
        Some("127.0.0.1" | "localhost" | "::1") => true,
        Some(h) if !h.is_empty() => false,
        _ => p.nodes.len() == 1,
    }
}

/// The host name other tasks reach this one by: $LLMAPI_ADVERTISE_HOST, else this task's node
/// name from the job's node list, else 127.0.0.1 (all tasks on one machine).
pub fn advertise_host(p: &Placement) -> String {
    std::env::var("LLMAPI_ADVERTISE_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| p.nodes.get(p.node_index).cloned())
        .unwrap_or_else(|| "127.0.0.1".to_owned())
}

/// Where a group meets and what its ranks' listeners bind. A group whose ranks all run on
/// one node meets on 127.0.0.1 and binds only that, so nothing off the node reaches it; a
/// group across nodes meets at its leader's node and binds this node's advertised address.
fn group_network(p: &Placement, role: &GroupRole, tp: usize) -> anyhow::Result<(String, IpAddr)> {
    let nodes: Option<Vec<usize>> = (role.leader_rank..role.leader_rank + tp)
        .map(|r| p.node_of_rank(r))
        .collect();
    let one_node =
        p.nodes.len() <= 1 || nodes.is_some_and(|n| n.iter().all(|node| Some(node) == n.first()));
    if one_node {
        return Ok(("127.0.0.1".to_owned(), IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
    match &role.leader_node {
        Some(leader) => Ok((leader.clone(), group::node_bind_address(&advertise_host(p)))),
        None => bail!(
            "cannot tell which node runs the leader of group {} (rank {}); the job's node list or tasks per node are missing",
            role.group,
            role.leader_rank
        ),
    }
}

/// This machine's host name, if the system tells it.
fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is writable for its whole length, which is what we pass.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end]).ok().map(str::to_owned)
}

/// The names a task's job-CA certificate carries besides the job's own name: its advertised
/// host, this machine's name, their addresses, and loopback.
fn certificate_names(p: &Placement) -> Vec<String> {
    use std::net::ToSocketAddrs;
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    for host in [Some(advertise_host(p)), host_name()].into_iter().flatten() {
        if let Ok(addrs) = (host.as_str(), 0).to_socket_addrs() {
            names.extend(addrs.map(|a| a.ip().to_string()));
        }
        names.push(host);
    }
    names.sort();
    names.dedup();
    names
}

/// This task's TLS between the job's tasks: the files given, else a fresh leaf of the job CA
/// that `secret` derives (the same CA in every task of the job).
fn job_tls(files: &TlsFiles, secret: &str, p: &Placement) -> anyhow::Result<TransportTls> {
    if !files.is_empty() {
        let tls = files.load()?;
        if tls.identity().is_none() || !tls.mutual() {
            bail!(
                "a job's tasks talk mutual TLS: give all three of --tls_cert_file, --tls_key_file and --tls_ca_file (each task's certificate signed by that CA, naming its node), or none of them for a CA generated from the job secret"
            );
        }
        return Ok(tls);
    }
    Ok(JobCa::derive(secret.as_bytes())?.transport(&certificate_names(p))?)
}

/// Tasks of this job on this task's node (they split its cores and memory).
fn tasks_on_node(p: &Placement) -> usize {
    p.tasks_per_node.get(p.node_index).copied().unwrap_or(1)
}

/// Compute threads of a rank: Slurm's --cpus-per-task when given (Slurm may already have
/// bound the task to those cores), else this node's cores shared by its tasks.
fn task_threads(p: &Placement) -> Option<usize> {
    if let Some(n) = std::env::var("SLURM_CPUS_PER_TASK")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return Some(n);
    }
    group::share_of_cores(tasks_on_node(p))
}

/// Runs this task until SIGTERM / Ctrl-C.
pub async fn run(
    args: LlmArgs,
    model: ModelDir,
    placement: Placement,
    opts: ClusterOptions,
) -> anyhow::Result<()> {
    let tp = args.tensor_parallel_size as usize;
    let role = placement.role(tp)?;
    // Before any model loads: rank 0 publishes the secret, the other ranks fetch it.
    let secret =
        crate::secret::for_job(&placement, opts.bootstrap_port, opts.router_url.is_some()).await?;
    let token = secret.token().to_owned();
    tracing::info!(origin = ?secret.origin(), "job secret ready");
    let loopback = on_one_node(&placement, &opts);
    let tls = job_tls(&opts.tls, &token, &placement)?;
    let group = if tp > 1 {
        group::check_sizes(&args, &model)?;
        let (host, bind) = group_network(&placement, &role, tp)?;
        let spec = GroupSpec {
            rank: role.rank_in_group,
            size: tp,
            ep_size: group::ep_size(&args),
            group: role.group,
            first_task: Some(role.leader_rank),
            rendezvous: format!("{host}:{}", role.rendezvous_port(opts.rendezvous_port)),
            bind,
            token: token.clone(),
            threads: task_threads(&placement),
            ranks_on_node: tasks_on_node(&placement),
            on_gpu: group::on_gpu(&args),
            gpu_slot: placement.local_rank,
        };
        if spec.rank != 0 {
            tracing::info!(
                rank = placement.rank,
                group = role.group,
                rank_in_group = spec.rank,
                "serving as a follower rank"
            );
            return tokio::task::spawn_blocking(move || group::run_follower(&args, &model, &spec))
                .await
                .context("the follower task failed")?;
        }
        Some(spec)
    } else {
        None
    };
    let mut config = crate::serve::router_config(&args, &model, &opts.router);
    let bind = if loopback { "127.0.0.1:0" } else { "0.0.0.0:0" };
    let restarts = if group.is_some() && opts.restarts.max_restarts > 0 {
        // Its followers are other tasks of the job, which this process cannot start again.
        tracing::warn!(
            group = role.group,
            "a failed tensor-parallel group of a Slurm/MPI job is not restarted (--max_restarts applies to single-rank workers): the group's tasks exit non-zero, for the job's scheduler to restart (e.g. sbatch --requeue)"
        );
        RestartPolicy { max_restarts: 0 }
    } else {
        opts.restarts
    };
    let worker = LocalWorker::start(
        &args,
        &model,
        config.served_model_name.clone(),
        bind,
        group,
        placement.local_rank,
        tasks_on_node(&placement),
        &token,
        Some(&tls),
    )
    .await?;
    let host = if loopback {
        "127.0.0.1".to_owned()
    } else {
        advertise_host(&placement)
    };
    let url = worker.url(&host);
    let slot: WorkerSlot = Arc::new(tokio::sync::Mutex::new(Some(worker)));
    let starter: restart::Starter = {
        let (args, model, token, tls) = (args.clone(), model.clone(), token.clone(), tls.clone());
        let (name, gpu_slot) = (config.served_model_name.clone(), placement.local_rank);
        let replicas_on_node = tasks_on_node(&placement);
        Box::new(move |addr| -> restart::Starting {
            let (args, model, name, token, tls) = (
                args.clone(),
                model.clone(),
                name.clone(),
                token.clone(),
                tls.clone(),
            );
            Box::pin(async move {
                LocalWorker::start(
                    &args,
                    &model,
                    name,
                    &addr.to_string(),
                    None,
                    gpu_slot,
                    replicas_on_node,
                    &token,
                    Some(&tls),
                )
                .await
            })
        })
    };
    let failed = restart::supervise(Arc::clone(&slot), None, restarts, starter);
    tracing::info!(rank = placement.rank, group = role.group, worker = %url, "worker ready");

    let result =
        if opts.router_url.is_none() && placement.rank == 0 {
            // The job's other leaders register from its nodes.
            config.registration.job_hosts = placement.nodes.clone();
            let bind = if loopback { "127.0.0.1" } else { "0.0.0.0" };
            let addr = format!("{bind}:{}", opts.registration_port);
            let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| {
            format!("binding {addr} for the job's registrations; pick a free --registration_port")
        })?;
            let registration = InternalRegistration {
                listener,
                tls: tls.clone(),
            };
            embedded_router(
                &args,
                &model,
                config,
                &url,
                token,
                tls,
                registration,
                failed,
            )
            .await
        } else {
            let targets = match &opts.router_url {
                Some(list) => register::router_urls(list)?
                    .iter()
                    .map(|r| register::external_router(r, &opts.tls, &tls))
                    .collect::<anyhow::Result<Vec<_>>>()?,
                None => {
                    let host = if loopback {
                        "127.0.0.1".to_owned()
                    } else {
                        placement
                            .nodes
                            .first()
                            .cloned()
                            .unwrap_or_else(|| "127.0.0.1".to_owned())
                    };
                    let name = match tls.server_name() {
                        Some(n) => n.to_owned(),
                        None => host.clone(),
                    };
                    vec![RegistrationTarget {
                        router: format!("https://{host}:{}", opts.registration_port),
                        tls: Some((tls.rustls_client()?, name)),
                    }]
                }
            };
            register::registered(&targets, &url, &token, failed).await
        };
    restart::stop(&slot).await;
    // Rank 0 stops publishing the secret (and removes its file) only now.
    drop(secret);
    result
}

#[allow(clippy::too_many_arguments)]
async fn embedded_router(
    args: &LlmArgs,
    model: &ModelDir,
    mut config: RouterConfig,
    own: &str,
    token: String,
    tls: TransportTls,
    registration: InternalRegistration,
    failed: impl Future<Output = String> + Send + 'static,
) -> anyhow::Result<()> {
    config.worker_token = Some(token.clone());
    // The tasks register with the job secret; an operator's admin token works beside it.
    // They register on the internal listener (`registration`), so the front's --host may
    // stay on loopback.
    config.job_token = Some(Secret::new("job token", token)?);
    crate::serve::run_router(
        args,
        model,
        config,
        &[own.to_owned()],
        Some(tls),
        Some(registration),
        failed,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::Launcher;

    fn placement(rank: usize, nodes: &[&str], tasks_per_node: &[usize]) -> Placement {
        Placement {
            launcher: Launcher::Slurm,
            rank,
            world_size: tasks_per_node.iter().sum(),
            local_rank: 0,
            node_index: 0,
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            tasks_per_node: tasks_per_node.to_vec(),
            job_id: Some("1".into()),
            visible_gpus: None,
        }
    }

    #[test]
    fn a_group_on_one_node_meets_and_listens_on_loopback_only() {
        // Two nodes of two tasks, tp 2: each group sits on one node.
        let p = placement(0, &["localhost", "elsewhere"], &[2, 2]);
        let role = p.role(2).unwrap();
        let (host, bind) = group_network(&p, &role, 2).unwrap();
        assert_eq!(host, "127.0.0.1");
        assert_eq!(bind, IpAddr::V4(Ipv4Addr::LOCALHOST));
        // MPI without a node list: one machine.
        let p = placement(0, &[], &[]);
        let (host, bind) = group_network(&p, &p.role(1).unwrap(), 1).unwrap();
        assert_eq!((host.as_str(), bind.is_loopback()), ("127.0.0.1", true));
    }

    #[test]
    fn a_group_across_nodes_meets_at_its_leader_and_never_binds_loopback() {
        let p = placement(0, &["localhost", "elsewhere"], &[1, 1]);
        let role = p.role(2).unwrap();
        let (host, bind) = group_network(&p, &role, 2).unwrap();
        assert_eq!(host, "localhost");
        // localhost resolves to loopback only: the listeners take every interface instead,
        // where the other node can reach them.
        assert!(!bind.is_loopback(), "{bind}");
        assert!(group::node_bind_address("127.0.0.1").is_unspecified());
    }
}
