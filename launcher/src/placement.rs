//! Where this process sits in a job: its rank, its node, and the group it serves in.
//!
//! Read from the Slurm environment (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID,
//! SLURM_STEP_NODELIST / SLURM_JOB_NODELIST, SLURM_TASKS_PER_NODE, SLURM_JOB_ID), else from
//! MPI launchers (OMPI_COMM_WORLD_*, PMI_*), else the process is a lone local launcher.

use std::collections::HashMap;

use serde::Deserialize;

/// A placement error, naming the variable and what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    /// A variable is missing or unreadable.
    #[error("{launcher} environment: {message}")]
    Env {
        /// slurm or mpi.
        launcher: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The world does not split into groups of tp_size ranks.
    #[error(
        "{world} ranks cannot form groups of --tp_size {tp_size}: the number of tasks must be a multiple of tp_size (e.g. srun -n {})",
        tp_size * world.div_ceil(*tp_size).max(1)
    )]
    Indivisible {
        /// World size.
        world: usize,
        /// Ranks per group.
        tp_size: usize,
    },
}

/// Who started this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// srun.
    Slurm,
    /// mpirun / mpiexec.
    Mpi,
    /// Nothing: llmapi-launch spawns its own ranks.
    Local,
}

/// This process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Who started the job.
    pub launcher: Launcher,
    /// Global rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Rank on this node.
    pub local_rank: usize,
    /// Index of this node among the job's nodes.
    pub node_index: usize,
    /// The job's nodes in order (empty when unknown, as under MPI without a host list).
    pub nodes: Vec<String>,
    /// Ranks on each node, in node order (Slurm's block distribution).
    pub tasks_per_node: Vec<usize>,
    /// The scheduler's job id, if any; binds the job secret's exchange (never the secret itself).
    pub job_id: Option<String>,
    /// GPUs visible to this process (SLURM_STEP_GPUS or CUDA_VISIBLE_DEVICES), if listed.
    pub visible_gpus: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct SlurmEnv {
    procid: usize,
    ntasks: usize,
    localid: usize,
    nodeid: usize,
    step_nodelist: Option<String>,
    job_nodelist: Option<String>,
    step_tasks_per_node: Option<String>,
    tasks_per_node: Option<String>,
    job_id: Option<String>,
    step_gpus: Option<String>,
}

impl Placement {
    /// Reads the placement from environment variables. `None` when neither Slurm nor MPI
    /// started this process.
    pub fn from_env<I>(vars: I) -> Result<Option<Self>, PlacementError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let vars: HashMap<String, String> = vars.into_iter().collect();
        if vars.contains_key("SLURM_PROCID") {
            return Self::from_slurm(&vars).map(Some);
        }
        if vars.contains_key("OMPI_COMM_WORLD_RANK") || vars.contains_key("PMI_RANK") {
            return Self::from_mpi(&vars).map(Some);
        }
        Ok(None)
    }

    fn from_slurm(vars: &HashMap<String, String>) -> Result<Self, PlacementError> {
        let err = |message: String| PlacementError::Env {
            launcher: "slurm",
            message,
        };
        let env: SlurmEnv = envy::prefixed("SLURM_")
            .from_iter(vars.iter().map(|(k, v)| (k.clone(), v.clone())))
            .map_err(|e| {
                err(match e {
                    envy::Error::MissingValue(field) => {
                        format!(
                            "SLURM_{} is unset (run the command under srun)",
                            field.to_uppercase()
                        )
                    }
                    envy::Error::Custom(m) => m.replace("provided by ", "provided by SLURM_"),
                })
            })?;
        let nodelist = env.step_nodelist.or(env.job_nodelist).ok_or_else(|| {
            err("SLURM_STEP_NODELIST and SLURM_JOB_NODELIST are both unset".into())
        })?;
        let nodes =
            expand_hostlist(&nodelist).map_err(|m| err(format!("node list '{nodelist}': {m}")))?;
        let tpn_text = env
            .step_tasks_per_node
            .or(env.tasks_per_node)
            .ok_or_else(|| err("SLURM_TASKS_PER_NODE is unset".into()))?;
        let tasks_per_node = expand_tasks_per_node(&tpn_text)
            .map_err(|m| err(format!("SLURM_TASKS_PER_NODE '{tpn_text}': {m}")))?;
        if tasks_per_node.len() != nodes.len() {
            return Err(err(format!(
                "SLURM_TASKS_PER_NODE '{tpn_text}' describes {} nodes but the node list '{nodelist}' has {}",
                tasks_per_node.len(),
                nodes.len()
            )));
        }
        let total: usize = tasks_per_node.iter().sum();
        if total != env.ntasks {
            return Err(err(format!(
                "SLURM_TASKS_PER_NODE '{tpn_text}' adds up to {total} tasks but SLURM_NTASKS is {}",
                env.ntasks
            )));
        }
        if env.procid >= env.ntasks {
            return Err(err(format!(
                "SLURM_PROCID {} is not below SLURM_NTASKS {}",
                env.procid, env.ntasks
            )));
        }
        if env.nodeid >= nodes.len() {
            return Err(err(format!(
                "SLURM_NODEID {} is outside the node list '{nodelist}'",
                env.nodeid
            )));
        }
        let placement = Self {
            launcher: Launcher::Slurm,
            rank: env.procid,
            world_size: env.ntasks,
            local_rank: env.localid,
            node_index: env.nodeid,
            nodes,
            tasks_per_node,
            job_id: env.job_id,
            visible_gpus: env
                .step_gpus
                .or_else(|| vars.get("CUDA_VISIBLE_DEVICES").cloned())
                .map(|g| g.split(',').map(str::to_owned).collect()),
        };
        // Group leaders are found by rank under block distribution; a process that is not
        // where block distribution puts it means another distribution was asked for.
        if placement.node_of_rank(placement.rank) != Some(placement.node_index) {
            return Err(err(format!(
                "rank {} runs on node {} but block distribution puts it on node {:?}; run srun with --distribution=block",
                placement.rank,
                placement.node_index,
                placement.node_of_rank(placement.rank)
            )));
        }
        Ok(placement)
    }

    fn from_mpi(vars: &HashMap<String, String>) -> Result<Self, PlacementError> {
        let get = |names: &[&str]| -> Result<Option<usize>, PlacementError> {
            for n in names {
                if let Some(v) = vars.get(*n) {
                    return v.trim().parse().map(Some).map_err(|_| PlacementError::Env {
                        launcher: "mpi",
                        message: format!("{n}='{v}' is not a whole number"),
                    });
                }
            }
            Ok(None)
        };
        let missing = |what: &str| PlacementError::Env {
            launcher: "mpi",
            message: format!("{what} is unset"),
        };
        let rank =
            get(&["OMPI_COMM_WORLD_RANK", "PMI_RANK"])?.ok_or_else(|| missing("the rank"))?;
        let world_size = get(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])?
            .ok_or_else(|| missing("OMPI_COMM_WORLD_SIZE / PMI_SIZE"))?;
        if rank >= world_size {
            return Err(PlacementError::Env {
                launcher: "mpi",
                message: format!("rank {rank} is not below the world size {world_size}"),
            });
        }
        let local_rank = get(&[
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "MPI_LOCALRANKID",
            "PMI_LOCAL_RANK",
        ])?
        .unwrap_or(0);
        let node_index = get(&["OMPI_COMM_WORLD_NODE_RANK"])?.unwrap_or(0);
        Ok(Self {
            launcher: Launcher::Mpi,
            rank,
            world_size,
            local_rank,
            node_index,
            nodes: Vec::new(),
            tasks_per_node: Vec::new(),
            job_id: vars.get("OMPI_MCA_ess_base_jobid").cloned(),
            visible_gpus: vars
                .get("CUDA_VISIBLE_DEVICES")
                .map(|g| g.split(',').map(str::to_owned).collect()),
        })
    }

    /// The node index a rank runs on under block distribution, if the node layout is known.
    pub fn node_of_rank(&self, rank: usize) -> Option<usize> {
        let mut first = 0;
        for (i, n) in self.tasks_per_node.iter().enumerate() {
            if rank < first + n {
                return Some(i);
            }
            first += n;
        }
        None
    }

    /// This process's role when the world is split into groups of `tp_size` ranks.
    pub fn role(&self, tp_size: usize) -> Result<GroupRole, PlacementError> {
        if tp_size == 0 || !self.world_size.is_multiple_of(tp_size) {
            return Err(PlacementError::Indivisible {
                world: self.world_size,
                tp_size,
            });
        }
        let group = self.rank / tp_size;
        let leader_rank = group * tp_size;
        Ok(GroupRole {
            group,
            num_groups: self.world_size / tp_size,
            rank_in_group: self.rank % tp_size,
            leader_rank,
            leader_node: self
                .node_of_rank(leader_rank)
                .and_then(|i| self.nodes.get(i).cloned()),
        })
    }
}

/// A rank's role in its model replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRole {
    /// Which replica.
    pub group: usize,
    /// How many replicas the job runs.
    pub num_groups: usize,
    /// Rank inside the replica (0 is its leader).
    pub rank_in_group: usize,
    /// Global rank of the replica's leader.
    pub leader_rank: usize,
    /// Host name of the leader's node, when the node list is known.
    pub leader_node: Option<String>,
}

impl GroupRole {
    /// The rendezvous port of this group: `base + group`.
    pub fn rendezvous_port(&self, base: u16) -> u16 {
        base.saturating_add(self.group as u16)
    }
}

/// Expands a Slurm host list (`node[01-04,07],gpu-[1-2]`), refusing reversed ranges.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, String> {
    if list.trim().is_empty() {
        return Err("empty".into());
    }
    for range in bracket_ranges(list) {
        if let Some((a, b)) = range.split_once('-')
            && let (Ok(x), Ok(y)) = (a.parse::<u64>(), b.parse::<u64>())
            && x > y
        {
            return Err(format!("range {range} runs backwards"));
        }
    }
    hostlist_parser::parse(list).map_err(|e| format!("not a host list ({e})"))
}

/// The comma-separated items inside every `[...]` of a host list.
fn bracket_ranges(list: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = list;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find(']') else {
            break;
        };
        out.extend(rest[open + 1..open + close].split(','));
        rest = &rest[open + close + 1..];
    }
    out
}

/// Expands SLURM_TASKS_PER_NODE (`2(x3),1`) into one count per node.
pub fn expand_tasks_per_node(text: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for item in text.split(',') {
        let item = item.trim();
        let (count, repeat) = match item.split_once("(x") {
            Some((c, r)) => {
                let r = r
                    .strip_suffix(')')
                    .ok_or_else(|| format!("'{item}' lacks its closing parenthesis"))?;
                (
                    c,
                    r.parse::<usize>()
                        .map_err(|_| format!("'{item}': bad repeat count"))?,
                )
            }
            None => (item, 1),
        };
        let count: usize = count
            .parse()
            .map_err(|_| format!("'{item}' is not a task count"))?;
        out.extend(std::iter::repeat_n(count, repeat));
    }
    Ok(out)
}

/// Port groups meet on when --rendezvous_port is not given: group g uses base + g.
pub const DEFAULT_RENDEZVOUS_PORT: u16 = 29500;

/// What `llmapi-launch env` prints for this process: its placement and role as one JSON
/// object, for checking an sbatch script before serving.
pub fn describe(
    p: &Placement,
    tp_size: usize,
    rendezvous_base: u16,
) -> Result<serde_json::Value, PlacementError> {
    let role = p.role(tp_size)?;
    let launcher = match p.launcher {
        Launcher::Slurm => "slurm",
        Launcher::Mpi => "mpi",
        Launcher::Local => "local",
    };
    let port = role.rendezvous_port(rendezvous_base);
    Ok(serde_json::json!({
        "launcher": launcher,
        "rank": p.rank,
        "world_size": p.world_size,
        "local_rank": p.local_rank,
        "node": p.nodes.get(p.node_index),
        "job_id": p.job_id,
        "visible_gpus": p.visible_gpus,
        "tp_size": tp_size,
        "group": role.group,
        "num_groups": role.num_groups,
        "rank_in_group": role.rank_in_group,
        "leader_rank": role.leader_rank,
        "leader_node": role.leader_node,
        "rendezvous": role.leader_node.as_ref().map(|n| format!("{n}:{port}")),
    }))
}

impl Placement {
    /// A single process started by hand: rank 0 of 1 on this host.
    pub fn local() -> Self {
        Self {
            launcher: Launcher::Local,
            rank: 0,
            world_size: 1,
            local_rank: 0,
            node_index: 0,
            nodes: vec!["localhost".into()],
            tasks_per_node: vec![1],
            job_id: None,
            visible_gpus: std::env::var("CUDA_VISIBLE_DEVICES")
                .ok()
                .map(|g| g.split(',').map(str::to_owned).collect()),
        }
    }
}
