//! Tensor-parallel worker groups: how a rank joins its group, runs as a follower, and how a
//! single `serve --tp_size N` without Slurm or MPI spawns and supervises its own ranks.
//!
//! A group of `tp_size` ranks meets at its leader's rendezvous address with the job token
//! (`llmapi_worker::dist::tcp`). The leader (rank 0 of the group) runs the engine's scheduler,
//! the worker gRPC service and perhaps the router; followers only run the forward on their
//! shard. If any rank dies the group stops: followers exit with an error naming the rank, the
//! leader fails its in-flight requests and exits with the reason.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use llmapi_common::args::LlmArgs;
use llmapi_common::model_config::ModelConfig;
use llmapi_common::model_dir::ModelDir;
use llmapi_worker::dist::tcp::RingConfig;
use llmapi_worker::dist::{CommError, Communicator, GroupDevice, form_group};
use llmapi_worker::engine::{EngineConfig, EngineError, EngineHandle};
use llmapi_worker::model::Shard;

/// How long a rank waits for its whole group to join (other ranks may still be loading).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one collective may wait on a peer before the group is declared broken. Longer
/// than the leader's idle heartbeat and than any single layer's compute.
pub const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment of a rank spawned by a local `serve --tp_size N`: its rank in the group.
pub const ENV_RANK: &str = "LLMAPI_GROUP_RANK";
/// Environment of a spawned rank: the leader's rendezvous address.
pub const ENV_RENDEZVOUS: &str = "LLMAPI_GROUP_RENDEZVOUS";
/// Environment of a spawned rank: the group's secret, inherited from its leader.
pub const ENV_TOKEN: &str = crate::secret::ENV_TOKEN;

/// Where a rank sits in its group.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    /// Rank inside the group; 0 leads.
    pub rank: usize,
    /// Ranks in the group (tp_size).
    pub size: usize,
    /// Ranks the experts are split over.
    pub ep_size: usize,
    /// Which group of the job (0 for a local group).
    pub group: usize,
    /// The job's task number of this group's rank 0, when a Slurm or MPI job started the
    /// group (errors then name the tasks of missing ranks).
    pub first_task: Option<usize>,
    /// The leader's rendezvous address, host:port.
    pub rendezvous: String,
    /// What this rank's listeners bind: 127.0.0.1 when the whole group is on this machine
    /// (`RingConfig::bind`).
    pub bind: IpAddr,
    /// The job secret (the ring's token).
    pub token: String,
    /// Compute threads of this rank; None: every core this process may use.
    pub threads: Option<usize>,
    /// Ranks and replicas on this rank's node, which split its cores (`threads`) and its
    /// host memory (`EngineConfig::replicas_on_node`) evenly.
    pub ranks_on_node: usize,
    /// `--backend cuda`: the rank runs on its GPU and the group talks over NCCL.
    pub on_gpu: bool,
    /// This rank's place among the tasks on its node (its local rank), which picks its GPU
    /// (`cuda::select::slot_gpu`).
    pub gpu_slot: usize,
}

/// Threads for one of `ranks_here` ranks sharing this process's cores evenly (more threads
/// than cores only make the ranks wait on each other in every collective); None for one.
pub fn share_of_cores(ranks_here: usize) -> Option<usize> {
    if ranks_here <= 1 {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / ranks_here).max(1))
}

impl GroupSpec {
    /// The engine settings of this rank.
    pub fn engine_config(&self, args: &LlmArgs) -> EngineConfig {
        let mut cfg = EngineConfig::from_llm_args(args);
        cfg.threads = self.threads;
        cfg.replicas_on_node = self.ranks_on_node.max(1);
        cfg.gpu_slot = self.gpu_slot;
        cfg
    }

    /// This rank's slice of the model.
    pub fn shard(&self) -> Result<Shard, EngineError> {
        Shard::new(self.rank, self.size, self.ep_size)
    }

    /// Joins the group's ring (blocking; bounded by `JOIN_TIMEOUT`), as the engine's
    /// `connect` step once this rank's shard is loaded. A CPU group talks over the TCP ring;
    /// a `--backend cuda` group forms NCCL over it on each rank's GPU
    /// (`cuda::select::slot_gpu` of `gpu_slot`, the GPU the engine puts the shard on).
    pub fn join(&self) -> Result<Box<dyn Communicator>, EngineError> {
        tracing::info!(
            rank = self.rank,
            size = self.size,
            rendezvous = %self.rendezvous,
            "shard loaded; joining the tensor-parallel group"
        );
        let ring = RingConfig {
            rank: self.rank,
            world_size: self.size,
            group: self.group,
            rendezvous: self.rendezvous.clone(),
            bind: self.bind,
            token: self.token.clone(),
            join_timeout: JOIN_TIMEOUT,
            op_timeout: OP_TIMEOUT,
        };
        let device = if self.on_gpu {
            let devices = llmapi_worker::backend::cuda::device_count()
                .map_err(|e| EngineError::Backend(e.to_string()))?;
            GroupDevice::Cuda {
                local_gpu: llmapi_worker::backend::cuda::select::slot_gpu(self.gpu_slot, devices),
            }
        } else {
            GroupDevice::Cpu
        };
        let comm = form_group(&ring, device).map_err(|e| {
            EngineError::Backend(format!(
                "forming the tensor-parallel group: {e}{}",
                self.task_hint(&e)
            ))
        })?;
        tracing::info!(rank = self.rank, "joined the group");
        Ok(comm)
    }
}

impl GroupSpec {
    /// Which tasks of the job the ranks that never joined are, when a job started the group.
    fn task_hint(&self, e: &CommError) -> String {
        match (e, self.first_task) {
            (CommError::NeverJoined { missing, .. }, Some(first)) => {
                let tasks: Vec<String> = missing
                    .iter()
                    .map(|r| format!("rank {r} is task {}", first + r))
                    .collect();
                format!(
                    " (in this job {}: SLURM_PROCID / OMPI_COMM_WORLD_RANK)",
                    tasks.join(", ")
                )
            }
            _ => String::new(),
        }
    }
}

/// The address a rank of a group spanning nodes binds its listeners to: the first address
/// of `host` (this node's advertised name) that is not loopback and that this machine can
/// bind; else 0.0.0.0 (every interface; the ring handshake still keeps strangers out).
pub fn node_bind_address(host: &str) -> IpAddr {
    let candidates: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => (host, 0)
            .to_socket_addrs()
            .map(|a| a.map(|a| a.ip()).collect())
            .unwrap_or_default(),
    };
    let usable = candidates.into_iter().find(|ip| {
        !ip.is_loopback()
            && !ip.is_unspecified()
            && std::net::TcpListener::bind(SocketAddr::new(*ip, 0)).is_ok()
    });
    usable.unwrap_or_else(|| {
        tracing::warn!(
            host,
            "this node's advertised name has no address this machine can bind (other than loopback); \
             the group's listeners bind every interface (0.0.0.0), guarded by the ring handshake"
        );
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    })
}

/// Whether the ranks run on GPUs (`--backend cuda`; auto keeps groups on the CPU).
pub fn on_gpu(args: &LlmArgs) -> bool {
    args.backend == llmapi_common::args::Backend::Cuda
}

/// ep_size as configured (default: tp_size).
pub fn ep_size(args: &LlmArgs) -> usize {
    args.moe_expert_parallel_size
        .unwrap_or(args.tensor_parallel_size) as usize
}

/// Runs a follower rank until its leader stops (Ok) or the group breaks (Err naming the rank).
pub fn run_follower(args: &LlmArgs, model: &ModelDir, spec: &GroupSpec) -> anyhow::Result<()> {
    let cfg = spec.engine_config(args);
    tracing::info!(rank = spec.rank, threads = ?cfg.threads, "loading this rank's shard");
    llmapi_worker::engine::run_follower(&model.path, &cfg, spec.shard()?, || spec.join())
        .with_context(|| format!("tensor-parallel rank {} stopped", spec.rank))?;
    tracing::info!(rank = spec.rank, "the leader stopped the group; exiting");
    Ok(())
}

/// The group spec of a rank spawned by a local `serve --tp_size N`, if this process is one.
pub fn spawned_rank(args: &LlmArgs) -> anyhow::Result<Option<GroupSpec>> {
    let Ok(rank) = std::env::var(ENV_RANK) else {
        return Ok(None);
    };
    let rank: usize = rank
        .parse()
        .with_context(|| format!("{ENV_RANK}={rank} is not a rank number"))?;
    let rendezvous = std::env::var(ENV_RENDEZVOUS)
        .with_context(|| format!("{ENV_RANK} is set but {ENV_RENDEZVOUS} is not"))?;
    let token = std::env::var(ENV_TOKEN)
        .with_context(|| format!("{ENV_RANK} is set but {ENV_TOKEN} is not"))?;
    let size = args.tensor_parallel_size as usize;
    Ok(Some(GroupSpec {
        rank,
        size,
        ep_size: ep_size(args),
        group: 0,
        first_task: None,
        rendezvous,
        // A spawned rank runs beside its parent: the group never leaves this machine.
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        token,
        threads: share_of_cores(size),
        ranks_on_node: size,
        on_gpu: on_gpu(args),
        // The ranks of a local group are this node's tasks 0..size.
        gpu_slot: rank,
    }))
}

/// Exits this process when its parent goes away (a spawned rank must not outlive the
/// `serve` that supervises it, even when that one is killed before the group forms).
pub fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(500));
            if std::os::unix::process::parent_id() != parent {
                eprintln!("error: the serve process that started this rank is gone; exiting");
                std::process::exit(1);
            }
        }
    });
}

/// The follower ranks 1..tp_size of a local group, child processes of this binary.
pub struct LocalRanks {
    children: Vec<(usize, Child)>,
}

impl LocalRanks {
    /// Spawns ranks 1..spec.size with this process's own arguments, pointed at `spec`.
    pub fn spawn(spec: &GroupSpec) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating this binary to start its ranks")?;
        let mut children = Vec::new();
        for rank in 1..spec.size {
            // Its own process group: a terminal's Ctrl-C reaches only the leader, which then
            // drains and stops its ranks in order.
            let child = Command::new(&exe)
                .process_group(0)
                .args(std::env::args_os().skip(1))
                .env(ENV_RANK, rank.to_string())
                .env(ENV_RENDEZVOUS, &spec.rendezvous)
                .env(ENV_TOKEN, &spec.token)
                .spawn()
                .with_context(|| format!("starting tensor-parallel rank {rank}"))?;
            tracing::info!(rank, pid = child.id(), "started a local rank");
            children.push((rank, child));
        }
        Ok(Self { children })
    }

    /// The first rank found exited, with its status.
    pub fn exited(&mut self) -> Option<String> {
        for (rank, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(format!(
                    "tensor-parallel rank {rank} (pid {}) exited: {status}",
                    child.id()
                ));
            }
        }
        None
    }

    /// Waits up to `grace` for the ranks to exit (after the leader told them to stop), then
    /// kills the rest.
    pub fn stop(&mut self, grace: Duration) {
        let deadline = std::time::Instant::now() + grace;
        for (rank, child) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if std::time::Instant::now() >= deadline => {
                        tracing::warn!(rank, "rank did not stop in time; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

impl Drop for LocalRanks {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Resolves when one of `ranks` exits; returns which and how.
pub async fn rank_exit(ranks: Arc<Mutex<LocalRanks>>) -> String {
    loop {
        if let Some(why) = ranks.lock().ok().and_then(|mut r| r.exited()) {
            return why;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Resolves when the group can no longer serve: the engine failed (a rank died or timed out)
/// or, for a local group, a spawned rank exited. Returns the reason.
pub async fn group_failure(engine: EngineHandle, ranks: Option<Arc<Mutex<LocalRanks>>>) -> String {
    loop {
        if let Some(why) = engine.failure() {
            return why;
        }
        let exited = ranks
            .as_ref()
            .and_then(|r| r.lock().ok().and_then(|mut r| r.exited()));
        if let Some(why) = exited {
            return why;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Refuses, before any rank starts, a split the model cannot take (sizes that do not divide
/// are named), an ep_size that does not divide tp_size, or, with `--backend cuda` (which has
/// no windowed attention), a max_seq_len that the model's sliding window does not cover.
pub fn check_sizes(args: &LlmArgs, model: &ModelDir) -> anyhow::Result<()> {
    let (tp, ep) = (args.tensor_parallel_size as usize, ep_size(args));
    if tp == 0 || ep == 0 || !tp.is_multiple_of(ep) {
        bail!("--ep_size {ep} must divide --tp_size {tp}");
    }
    let config = ModelConfig::from_model_dir(&model.path)
        .with_context(|| format!("reading {}", model.path.display()))?;
    Shard::new(0, tp, ep)
        .and_then(|s| s.check(&config))
        .with_context(|| format!("--tp_size {tp} on {}", model.path.display()))?;
    let max_seq_len = args
        .max_seq_len
        .map_or(config.max_position_embeddings, |n| n as usize);
    if args.backend == llmapi_common::args::Backend::Cuda
        && let Err(why) = config.check_full_attention_covers("cuda", max_seq_len)
    {
        bail!("{}: {why}", model.path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_sharing_a_machine_share_its_cores() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(share_of_cores(1), None);
        assert_eq!(share_of_cores(2), Some((cores / 2).max(1)));
        assert_eq!(share_of_cores(10_000), Some(1));
    }

    /// A missing rank of a job's group is named with its task, which is what the job's logs
    /// and `srun` are indexed by.
    #[test]
    fn a_rank_that_never_joined_a_job_group_is_named_with_its_task() {
        let spec = GroupSpec {
            rank: 0,
            size: 4,
            ep_size: 4,
            group: 1,
            first_task: Some(4),
            rendezvous: "127.0.0.1:1".to_owned(),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            token: "t".to_owned(),
            threads: None,
            ranks_on_node: 1,
            on_gpu: false,
            gpu_slot: 0,
        };
        let missing = CommError::NeverJoined {
            rank: 0,
            group: 1,
            missing: vec![2, 3],
            address: spec.rendezvous.clone(),
            timeout: JOIN_TIMEOUT,
        };
        let hint = spec.task_hint(&missing);
        assert!(
            hint.contains("rank 2 is task 6, rank 3 is task 7"),
            "{hint}"
        );
        let local = GroupSpec {
            first_task: None,
            ..spec
        };
        assert_eq!(local.task_hint(&missing), "");
    }

    /// A rank's engine runs on the GPU of its place on the node, not of its rank in the
    /// group: the second group on a node must not land on the first group's GPUs.
    #[test]
    fn a_rank_engine_takes_its_local_slot_not_its_group_rank() {
        let spec = GroupSpec {
            rank: 1,
            size: 2,
            ep_size: 2,
            group: 0,
            first_task: None,
            rendezvous: "127.0.0.1:1".to_owned(),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            token: "t".to_owned(),
            threads: Some(3),
            ranks_on_node: 4,
            on_gpu: true,
            gpu_slot: 3,
        };
        let cfg = spec.engine_config(&LlmArgs::default());
        assert_eq!((cfg.gpu_slot, cfg.threads), (3, Some(3)));
        assert_eq!(
            cfg.replicas_on_node, 4,
            "the node's ranks split its memory too"
        );
        assert_eq!(
            llmapi_worker::backend::cuda::select::slot_gpu(cfg.gpu_slot, 8),
            3
        );
    }
}
