//! The leader -> follower step plan channel of a tensor-parallel group.
//!
//! The leader (rank 0) owns the scheduler; before each forward it broadcasts the step's plan
//! (per sequence chunk: tokens, start position, block table, logits wanted) so every follower
//! runs the same forward on its shard. While idle the leader broadcasts a heartbeat every
//! `HEARTBEAT`, so a follower waiting for the next plan never reaches its collective timeout
//! and a dead rank is noticed within one heartbeat even when no request is running.
//! Messages travel as a length broadcast followed by a payload broadcast over the group's
//! communicator; the encoding is little-endian u32 words.

use std::time::Duration;

use super::{CommError, Communicator};
use crate::backend::{Backend, BackendError, HostFootprint, LogitsWanted, SeqChunk};
use crate::kv::BlockId;

/// How often an idle leader proves it is alive; followers' collective timeout must be longer.
pub const HEARTBEAT: Duration = Duration::from_millis(500);

/// One sequence's share of a step, owned (a follower has no scheduler to borrow from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedChunk {
    /// Tokens whose KV is computed this step.
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`.
    pub start_pos: usize,
    /// Blocks holding positions `0..start_pos + tokens.len()`.
    pub block_table: Vec<BlockId>,
    /// Which logits to return.
    pub logits: LogitsWanted,
}

impl PlannedChunk {
    /// Borrows as the backend's view.
    pub fn as_chunk(&self) -> SeqChunk<'_> {
        SeqChunk {
            tokens: &self.tokens,
            start_pos: self.start_pos,
            block_table: &self.block_table,
            logits: self.logits,
        }
    }
}

/// What the leader tells its followers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanMsg {
    /// Allocate the KV pool (sized by the leader so every rank has the same block ids).
    InitKv {
        /// Blocks in the pool.
        num_blocks: usize,
        /// Tokens per block.
        tokens_per_block: usize,
    },
    /// Run one forward step over these chunks.
    Step(Vec<PlannedChunk>),
    /// Nothing to run; the leader is alive.
    Heartbeat,
    /// The leader is shutting down; followers exit cleanly.
    Stop,
}

/// A plan message that cannot be decoded (ranks running different builds, or a bug).
#[derive(Debug, thiserror::Error)]
#[error("malformed step plan: {0}")]
pub struct PlanDecodeError(String);

const INIT: u32 = 1;
const STEP: u32 = 2;
const HEARTBEAT_TAG: u32 = 3;
const STOP: u32 = 4;

fn logits_code(l: LogitsWanted) -> u32 {
    match l {
        LogitsWanted::None => 0,
        LogitsWanted::Last => 1,
        LogitsWanted::All => 2,
    }
}

impl PlanMsg {
    /// The message as u32 words.
    pub fn encode(&self) -> Vec<u32> {
        match self {
            Self::InitKv {
                num_blocks,
                tokens_per_block,
            } => vec![INIT, *num_blocks as u32, *tokens_per_block as u32],
            Self::Step(chunks) => {
                let mut w = vec![STEP, chunks.len() as u32];
                for c in chunks {
                    w.extend([
                        c.start_pos as u32,
                        logits_code(c.logits),
                        c.tokens.len() as u32,
                        c.block_table.len() as u32,
                    ]);
                    w.extend(&c.tokens);
                    w.extend(&c.block_table);
                }
                w
            }
            Self::Heartbeat => vec![HEARTBEAT_TAG],
            Self::Stop => vec![STOP],
        }
    }

    /// Decodes `encode`'s words.
    pub fn decode(words: &[u32]) -> Result<Self, PlanDecodeError> {
        let mut it = words.iter().copied();
        let mut next = |what: &str| {
            it.next()
                .ok_or_else(|| PlanDecodeError(format!("ends before {what}")))
        };
        let msg = match next("the tag")? {
            INIT => Self::InitKv {
                num_blocks: next("num_blocks")? as usize,
                tokens_per_block: next("tokens_per_block")? as usize,
            },
            STEP => {
                let n = next("the chunk count")?;
                let mut chunks = Vec::with_capacity(n.min(4096) as usize);
                for _ in 0..n {
                    let start_pos = next("start_pos")? as usize;
                    let logits = match next("logits")? {
                        0 => LogitsWanted::None,
                        1 => LogitsWanted::Last,
                        2 => LogitsWanted::All,
                        x => return Err(PlanDecodeError(format!("logits code {x}"))),
                    };
                    let nt = next("the token count")?;
                    let nb = next("the block count")?;
                    let tokens = (0..nt).map(|_| next("a token")).collect::<Result<_, _>>()?;
                    let block_table = (0..nb).map(|_| next("a block")).collect::<Result<_, _>>()?;
                    chunks.push(PlannedChunk {
                        tokens,
                        start_pos,
                        block_table,
                        logits,
                    });
                }
                Self::Step(chunks)
            }
            HEARTBEAT_TAG => Self::Heartbeat,
            STOP => Self::Stop,
            x => return Err(PlanDecodeError(format!("unknown tag {x}"))),
        };
        if it.next().is_some() {
            return Err(PlanDecodeError("trailing words".into()));
        }
        Ok(msg)
    }
}

/// Broadcasts `msg` from rank 0.
pub fn send(comm: &mut dyn Communicator, msg: &PlanMsg) -> Result<(), CommError> {
    let words = msg.encode();
    let mut len = (words.len() as u64).to_le_bytes();
    comm.broadcast(&mut len, 0)?;
    let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    comm.broadcast(&mut bytes, 0)
}

/// Errors of a follower's loop.
#[derive(Debug, thiserror::Error)]
pub enum FollowerError {
    /// The group broke (a rank died or timed out).
    #[error(transparent)]
    Comm(#[from] CommError),
    /// The leader sent something this build cannot read.
    #[error(transparent)]
    Decode(#[from] PlanDecodeError),
    /// The backend failed in a way the group cannot survive.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Receives the next message broadcast by rank 0.
pub fn recv(comm: &mut dyn Communicator) -> Result<PlanMsg, FollowerError> {
    let mut len = [0u8; 8];
    comm.broadcast(&mut len, 0)?;
    let n = u64::from_le_bytes(len) as usize;
    if n > (1 << 28) {
        return Err(PlanDecodeError(format!("a plan of {n} words")).into());
    }
    let mut bytes = vec![0u8; n * 4];
    comm.broadcast(&mut bytes, 0)?;
    let words: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(PlanMsg::decode(&words)?)
}

/// A follower rank: runs every step the leader plans on its shard until the leader says
/// Stop (Ok) or the group breaks (Err naming the rank). A step the backend refuses as
/// invalid is refused by the leader too (same inputs, same checks), so it is skipped.
pub fn follow(backend: &mut dyn Backend, plan: &mut dyn Communicator) -> Result<(), FollowerError> {
    loop {
        match recv(plan)? {
            PlanMsg::InitKv {
                num_blocks,
                tokens_per_block,
            } => backend.init_kv(num_blocks, tokens_per_block)?,
            PlanMsg::Step(chunks) => {
                let views: Vec<SeqChunk<'_>> = chunks.iter().map(PlannedChunk::as_chunk).collect();
                match backend.forward(&views) {
                    Ok(_) => {}
                    Err(e) if e.is_fatal() => return Err(e.into()),
                    Err(e) => tracing::warn!(error = %e, "step refused on this rank too"),
                }
            }
            PlanMsg::Heartbeat => {}
            PlanMsg::Stop => return Ok(()),
        }
    }
}

/// The leader's backend: broadcasts each step's plan to the followers, then runs the step on
/// its own shard. Dropping it tells the followers to stop.
pub struct LeaderBackend {
    inner: Box<dyn Backend>,
    plan: Box<dyn Communicator>,
    stopped: bool,
}

impl LeaderBackend {
    /// Wraps rank 0's backend; `plan` reaches the same group as the backend's communicator.
    pub fn new(inner: Box<dyn Backend>, plan: Box<dyn Communicator>) -> Self {
        Self {
            inner,
            plan,
            stopped: false,
        }
    }

    fn send(&mut self, msg: &PlanMsg) -> Result<(), BackendError> {
        if self.stopped {
            return Err(BackendError::InvalidStep(
                "the group has stopped; no further steps".into(),
            ));
        }
        send(self.plan.as_mut(), msg).map_err(|e| {
            self.stopped = true;
            BackendError::Collective(e)
        })
    }
}

impl Backend for LeaderBackend {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn windowed_attention(&self) -> bool {
        self.inner.windowed_attention()
    }
    /// This rank's bytes per token: every rank holds its own KV heads in a pool of the
    /// same blocks, and the budget is one rank's share of its node (the launcher counts the
    /// ranks sharing a node in `EngineConfig::replicas_on_node`).
    fn kv_bytes_per_token(&self) -> usize {
        self.inner.kv_bytes_per_token()
    }
    fn kv_memory_available(&self) -> Option<usize> {
        self.inner.kv_memory_available()
    }
    fn host_footprint(&self, max_num_tokens: usize, max_batch_size: usize) -> HostFootprint {
        self.inner.host_footprint(max_num_tokens, max_batch_size)
    }
    fn init_kv(&mut self, num_blocks: usize, tokens_per_block: usize) -> Result<(), BackendError> {
        self.send(&PlanMsg::InitKv {
            num_blocks,
            tokens_per_block,
        })?;
        self.inner.init_kv(num_blocks, tokens_per_block)
    }
    fn forward(&mut self, batch: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        let chunks = batch
            .iter()
            .map(|c| PlannedChunk {
                tokens: c.tokens.to_vec(),
                start_pos: c.start_pos,
                block_table: c.block_table.to_vec(),
                logits: c.logits,
            })
            .collect();
        self.send(&PlanMsg::Step(chunks))?;
        let out = self.inner.forward(batch);
        if matches!(&out, Err(e) if e.is_fatal()) {
            self.stopped = true;
        }
        out
    }
    fn heartbeat_interval(&self) -> Option<Duration> {
        Some(HEARTBEAT)
    }
    fn heartbeat(&mut self) -> Result<(), BackendError> {
        self.send(&PlanMsg::Heartbeat)
    }
}

impl Drop for LeaderBackend {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = send(self.plan.as_mut(), &PlanMsg::Stop);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_survives_encoding() {
        let msgs = [
            PlanMsg::InitKv {
                num_blocks: 100,
                tokens_per_block: 32,
            },
            PlanMsg::Step(vec![
                PlannedChunk {
                    tokens: vec![1, 2, 3],
                    start_pos: 0,
                    block_table: vec![7],
                    logits: LogitsWanted::All,
                },
                PlannedChunk {
                    tokens: vec![9],
                    start_pos: 40,
                    block_table: vec![1, 2],
                    logits: LogitsWanted::Last,
                },
            ]),
            PlanMsg::Heartbeat,
            PlanMsg::Stop,
        ];
        for m in msgs {
            assert_eq!(PlanMsg::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn truncated_or_unknown_messages_are_refused() {
        let words = PlanMsg::Step(vec![PlannedChunk {
            tokens: vec![1, 2],
            start_pos: 0,
            block_table: vec![0],
            logits: LogitsWanted::None,
        }])
        .encode();
        assert!(PlanMsg::decode(&words[..words.len() - 1]).is_err());
        assert!(PlanMsg::decode(&[99]).is_err());
        assert!(PlanMsg::decode(&[]).is_err());
    }
}
