//! Collectives between the ranks of one worker group.
//!
//! `Communicator` is what tensor- and expert-parallel model code calls; `tcp::TcpRing` runs it
//! over TCP on any machine, and `nccl::NcclComm` runs it on GPUs (`form_group` picks one).
//! Every operation has a bounded wait and names the rank that failed, so a dead rank stops its
//! group instead of hanging it.

mod handshake;
pub mod nccl;
pub mod plan;
mod rendezvous;
pub mod tcp;

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A collective failed; the group cannot continue.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A peer did not answer in time.
    #[error("rank {rank}: no answer from rank {peer} within {timeout:?} during {op}")]
    Timeout {
        /// This rank.
        rank: usize,
        /// The silent peer.
        peer: usize,
        /// The limit.
        timeout: Duration,
        /// The operation.
        op: &'static str,
    },
    /// A peer closed its connection or the connection failed.
    #[error(
        "rank {rank}: ring broken at rank {peer} during {op} (rank {peer}, or a rank before it in the ring, stopped): {message}"
    )]
    PeerLost {
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// The operation.
        op: &'static str,
        /// What the socket said.
        message: String,
    },
    /// The group could not be formed.
    #[error("rank {rank}: cannot join the group at {address}: {message}")]
    Rendezvous {
        /// This rank.
        rank: usize,
        /// The leader's rendezvous address.
        address: String,
        /// What went wrong.
        message: String,
    },
    /// Ranks of the group did not join before the formation deadline.
    #[error("{}", never_joined(*.group, .missing, .address, *.timeout))]
    NeverJoined {
        /// This rank.
        rank: usize,
        /// Which group of the job (for the message).
        group: usize,
        /// The ranks that never came (`[0]`: the leader never answered).
        missing: Vec<usize>,
        /// The leader's rendezvous address.
        address: String,
        /// The formation deadline.
        timeout: Duration,
    },
    /// NCCL is missing, could not be initialised, or a collective failed (the communicator is
    /// then aborted).
    #[error("rank {rank}: {message}")]
    Nccl {
        /// This rank.
        rank: usize,
        /// What went wrong and what to do.
        message: String,
    },
    /// Arguments that cannot work (e.g. buffer sizes that differ).
    #[error("rank {rank}: {message}")]
    Usage {
        /// This rank.
        rank: usize,
        /// What is wrong.
        message: String,
    },
}

/// A wait as people read it in messages: "120 s", "500 ms".
fn span(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// What to check when ranks never came, worded for one rank, several, or the leader.
fn never_joined(group: usize, missing: &[usize], address: &str, timeout: Duration) -> String {
    let within = span(timeout);
    match missing {
        [0] => format!(
            "rank 0 of group {group} (its leader) never opened the rendezvous at {address} within {within}; \
             check that the leader's task started and is still running (its log says why not) and that this node reaches {address}"
        ),
        [one] => format!(
            "rank {one} of group {group} never joined the rendezvous at {address} within {within}; \
             check that the task of rank {one} started and is still running (its log says why not), that it reaches {address}, \
             and that it has this job's secret (the same LLMAPI_JOB_TOKEN or LLMAPI_JOB_TOKEN_FILE)"
        ),
        several => {
            let list: Vec<String> = several.iter().map(usize::to_string).collect();
            format!(
                "ranks {} of group {group} never joined the rendezvous at {address} within {within}; \
                 check that their tasks started and are still running (their logs say why not), that they reach {address}, \
                 and that they have this job's secret (the same LLMAPI_JOB_TOKEN or LLMAPI_JOB_TOKEN_FILE)",
                list.join(", ")
            )
        }
    }
}

/// Collectives over the ranks of one group. Every rank must call the same operations in the
/// same order with buffers of the same length.
pub trait Communicator: Send {
    /// This rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn world_size(&self) -> usize;
    /// Element-wise sum over all ranks, in place on every rank.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError>;
    /// Concatenates every rank's `local` in rank order into `out` (`world_size * local.len()`).
    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<(), CommError>;
    /// Copies `buf` of rank `root` into `buf` of every rank.
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CommError>;
    /// Whether `all_reduce_sum_device` works here (NCCL); a GPU backend stages its buffers
    /// through host memory and `all_reduce_sum` otherwise.
    fn moves_device_memory(&self) -> bool {
        false
    }
    /// Element-wise sum over all ranks, in place, of `count` f32 at device address `ptr` on
    /// this rank's GPU; returns once the sum is complete on the GPU. Communicators that move
    /// host memory only refuse it.
    ///
    /// # Safety
    /// `ptr` must address `count` live f32 on the GPU (and CUDA context) the communicator was
    /// formed on, every write to them must be complete, and nothing may use them until this
    /// returns.
    unsafe fn all_reduce_sum_device(&mut self, ptr: u64, count: usize) -> Result<(), CommError> {
        let _ = (ptr, count);
        Err(CommError::Usage {
            rank: self.rank(),
            message: "this communicator moves host memory only; stage device buffers through the host (moves_device_memory is false)".into(),
        })
    }
}

/// What the ranks of a group compute on, which decides the group's communicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupDevice {
    /// The CPU backend: the TCP ring carries the collectives.
    Cpu,
    /// The CUDA backend on GPU `local_gpu` (the rank's local rank on its node): NCCL carries
    /// the collectives, bootstrapped over the TCP ring.
    Cuda {
        /// This rank's GPU.
        local_gpu: usize,
    },
}

/// Which communicator a group on `device` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommKind {
    /// `tcp::TcpRing`.
    TcpRing,
    /// `nccl::NcclComm` (with a TCP ring beside it for bootstrap and failure detection).
    Nccl,
}

impl GroupDevice {
    /// The device of a rank whose `--backend` resolved to `choice`; `local_gpu` (the rank's
    /// local rank on its node) is its GPU when that is CUDA.
    pub fn for_backend(choice: crate::backend::cuda::select::Choice, local_gpu: usize) -> Self {
        match choice {
            crate::backend::cuda::select::Choice::Cpu => Self::Cpu,
            crate::backend::cuda::select::Choice::Cuda => Self::Cuda { local_gpu },
        }
    }

    /// NCCL on GPUs, the TCP ring otherwise.
    pub fn comm_kind(self) -> CommKind {
        match self {
            Self::Cpu => CommKind::TcpRing,
            Self::Cuda { .. } => CommKind::Nccl,
        }
    }
}

/// Joins the group described by `ring` and returns its communicator for `device`: the TCP
/// ring itself on CPUs; on GPUs an NCCL communicator bootstrapped over that ring (which stays
/// open beside it to name a failed rank). Blocks until the group has formed or a bound passes.
pub fn form_group(
    ring: &tcp::RingConfig,
    device: GroupDevice,
) -> Result<Box<dyn Communicator>, CommError> {
    let tcp = tcp::TcpRing::join(ring)?;
    match device {
        GroupDevice::Cpu => Ok(Box::new(tcp)),
        GroupDevice::Cuda { local_gpu } => {
            let timeouts = nccl::NcclTimeouts {
                init: ring.join_timeout,
                op: ring.op_timeout,
            };
            let comm = nccl::NcclComm::bootstrap(Box::new(tcp), local_gpu, timeouts)?;
            Ok(Box::new(comm))
        }
    }
}

/// The communicator of a group of one: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }
    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        if out.len() != local.len() {
            return Err(CommError::Usage {
                rank: 0,
                message: format!(
                    "all_gather output holds {} values, expected {}",
                    out.len(),
                    local.len()
                ),
            });
        }
        out.copy_from_slice(local);
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut [u8], _root: usize) -> Result<(), CommError> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        Ok(())
    }
}

/// One communicator used from several places of the same rank (the backend's collectives
/// and the step plan channel): clones share the connection, and every operation locks it so
/// the calls of one rank stay in one order.
#[derive(Clone)]
pub struct SharedComm {
    inner: Arc<Mutex<Box<dyn Communicator>>>,
    rank: usize,
    world: usize,
}

impl SharedComm {
    /// Shares `comm`.
    pub fn new(comm: Box<dyn Communicator>) -> Self {
        Self {
            rank: comm.rank(),
            world: comm.world_size(),
            inner: Arc::new(Mutex::new(comm)),
        }
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut dyn Communicator) -> Result<T, CommError>,
    ) -> Result<T, CommError> {
        let mut guard = self.inner.lock().map_err(|_| CommError::Usage {
            rank: self.rank,
            message: "a collective panicked earlier on this rank; the group cannot continue".into(),
        })?;
        f(guard.as_mut())
    }
}

impl Communicator for SharedComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.with(|c| c.all_reduce_sum(buf))
    }
    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        self.with(|c| c.all_gather(local, out))
    }
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        self.with(|c| c.broadcast(buf, root))
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.with(|c| c.barrier())
    }
    fn moves_device_memory(&self) -> bool {
        self.with(|c| Ok(c.moves_device_memory())).unwrap_or(false)
    }
    unsafe fn all_reduce_sum_device(&mut self, ptr: u64, count: usize) -> Result<(), CommError> {
        // SAFETY: the caller's guarantees pass through unchanged.
        self.with(|c| unsafe { c.all_reduce_sum_device(ptr, count) })
    }
}
