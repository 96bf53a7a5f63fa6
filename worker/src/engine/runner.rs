//! The engine thread: drain commands, plan a step, run the backend, sample, emit events.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

mod draft_model;
mod speculative;
mod validate;

pub(crate) use validate::validate;

use super::{Command, EngineConfig, EngineInfo, Status};
use super::{FinishReason, GenerateParams, LoadStats, Timings, TokenEvent, TokenLogprob, Usage};

use crate::backend::{Backend, BackendError, LogitsWanted, SeqChunk};
use crate::kv::BlockManager;
use crate::sampling::{Guide, SampleJob, Sampler, log_softmax, sample_batch, token_logprob};
use crate::scheduler::{PlanItem, Scheduler, SchedulerLimits, Sequence};
use speculative::Speculation;

/// A request on its way to the engine thread.
pub(crate) struct NewRequest {
    pub(crate) params: GenerateParams,
    /// The compiled grammar of `params.sampling.guided`, already past `params.generated`.
    pub(crate) guide: Option<Guide>,
    pub(crate) tx: UnboundedSender<TokenEvent>,
    pub(crate) arrival: Instant,
}

/// The prompt tokens a step may take on: `prefill_token_budget` when set, else the CPU
/// default on the CPU backend (whose prefill runs at a few thousand tokens per second) and
/// `max_num_tokens` on others; never above `max_num_tokens`.
fn prefill_budget(cfg: &EngineConfig, backend: &str) -> usize {
    let budget = match cfg.prefill_token_budget {
        Some(n) => n,
        None if backend == "cpu" => super::CPU_PREFILL_TOKEN_BUDGET,
        None => cfg.max_num_tokens,
    };
    budget.clamp(1, cfg.max_num_tokens.max(1))
}

/// Prompt + output tokens a request may reach: `max_seq_len + 1`, as in trtllm-serve, whose
/// executor runs with one slot more than max_seq_len. The last sampled token is never fed
/// back, so a sequence still holds at most max_seq_len tokens of KV cache and positions.
fn total_len(req: &GenerateParams, max_seq_len: usize) -> usize {
    let n = req.prompt.len();
    let limit = max_seq_len + 1;
    match req.stopping.max_tokens {
        0 => limit,
        m => (n + m as usize).min(limit),
    }
}

pub(crate) struct Runner {
    backend: Box<dyn Backend>,
    sched: Scheduler,
    info: EngineInfo,
    status: Arc<Status>,
    print_iter_log: bool,
    /// Distributions of the steps run so far (reported by Load).
    steps: super::StepStats,
    iter: u64,
    /// When the backend last ran a step or a heartbeat (a group leader must reach its
    /// followers at least every `heartbeat_interval`).
    last_contact: Instant,
    /// When the previous step ended (the iteration log reports the time between steps).
    last_step_end: Option<Instant>,
    /// Speculative decoding, when `speculative_config` is set.
    spec: Option<Speculation>,
}

impl Runner {
    /// `window`: the sliding window every layer of the model shares, when the backend applies
    /// it (blocks before it are then freed).
    pub(crate) fn new(
        backend: Box<dyn Backend>,
        draft: Option<Box<dyn Backend>>,
        cfg: EngineConfig,
        info: EngineInfo,
        num_blocks: usize,
        status: Arc<Status>,
        window: Option<usize>,
    ) -> Self {
        let prefill_budget = prefill_budget(&cfg, backend.name());
        tracing::info!(
            prefill_budget,
            max_num_tokens = cfg.max_num_tokens,
            chunked_prefill = cfg.enable_chunked_prefill,
            "scheduler token budgets per step"
        );
        let limits = SchedulerLimits {
            max_batch_size: cfg.max_batch_size,
            max_num_tokens: cfg.max_num_tokens,
            prefill_budget,
            chunked_prefill: cfg.enable_chunked_prefill,
            policy: cfg.capacity_policy,
        };
        let bm = BlockManager::new(num_blocks, cfg.tokens_per_block, cfg.enable_block_reuse);
        if let Some(window) = window {
            tracing::info!(
                window,
                "every layer attends over a sliding window: KV blocks before it are freed as sequences grow"
            );
        }
        let spec = cfg
            .speculative
            .as_ref()
            .map(|c| Speculation::from_config(c, draft, cfg.max_num_tokens));
        if let Some(s) = &spec {
            tracing::info!(proposer = ?s.proposer, "speculative decoding");
        }
        Self {
            spec,
            sched: Scheduler::new(limits, bm).with_window_of_every_layer(window),
            backend,
            info,
            status,
            print_iter_log: cfg.print_iter_log,
            steps: super::StepStats::default(),
            iter: 0,
            last_contact: Instant::now(),
            last_step_end: None,
        }
    }

    pub(crate) fn run(mut self, rx: Receiver<Command>) {
        let status = Arc::clone(&self.status);
        let heartbeat = &status.heartbeat;
        loop {
            let cmd = if self.sched.is_idle() {
                heartbeat.waiting();
                let cmd = match self.backend.heartbeat_interval() {
                    None => match rx.recv() {
                        Ok(c) => Some(c),
                        Err(_) => break,
                    },
                    Some(every) => match rx.recv_timeout(every) {
                        Ok(c) => Some(c),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    },
                };
                heartbeat.beat();
                cmd
            } else {
                heartbeat.beat();
                rx.try_recv().ok()
            };
            if let Some(cmd) = cmd {
                if !self.handle(cmd) {
                    break;
                }
                while let Ok(cmd) = rx.try_recv() {
                    if !self.handle(cmd) {
                        self.fail_all("the engine is shutting down");
                        return;
                    }
                }
            }
            self.drop_disconnected();
            let stepped = if self.sched.is_idle() {
                Ok(())
            } else {
                self.step()
            };
            if let Err(fatal) = stepped.and_then(|()| self.keep_alive()) {
                self.fail_group(&fatal);
                return;
            }
            self.publish_load();
        }
        self.fail_all("the engine is shutting down");
    }

    /// Sends a heartbeat when the backend asks for them and nothing reached it for an
    /// interval (idle, or iterations that planned no step); Err when the group is broken.
    fn keep_alive(&mut self) -> Result<(), String> {
        let Some(every) = self.backend.heartbeat_interval() else {
            return Ok(());
        };
        if self.last_contact.elapsed() < every {
            return Ok(());
        }
        self.last_contact = Instant::now();
        match self.backend.heartbeat() {
            Err(e) if e.is_fatal() => Err(e.to_string()),
            _ => Ok(()),
        }
    }

    /// The backend can take no further steps (a rank of its group died): every request ends
    /// with the reason, handles report it, and the loop ends.
    fn fail_group(&mut self, why: &str) {
        tracing::error!(error = %why, "the worker group failed; the engine stops");
        if let Ok(mut f) = self.status.failed.lock() {
            *f = Some(why.to_string());
        }
        self.fail_all(&format!("the worker group failed: {why}"));
    }

    /// Applies a command; false means shut down.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(req) => self.enqueue(*req),
            Command::Abort(id) => {
                if let Some(seq) = self.sched.remove(&id) {
                    self.finish_event(&seq, FinishReason::Abort, None);
                    self.forget(&seq.id);
                }
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn enqueue(&mut self, req: NewRequest) {
        let p = req.params;
        let max_seq_len = self.info.max_seq_len as usize;
        let max_total = total_len(&p, max_seq_len);
        let prompt_len = p.prompt.len();
        let drawn = p.generated.len();
        let mut tokens = p.prompt;
        // A migrated request's tokens so far are recomputed with its prompt, as a preempted
        // sequence's are, and count as generated.
        tokens.extend(p.generated);
        let spec = self
            .spec
            .as_ref()
            .map(|s| s.new_sequence(req.guide.is_some()));
        let seq = Sequence {
            draft: Vec::new(),
            draft_computed: 0,
            spec,
            id: p.request_id,
            prompt_len,
            group: p.group,
            tokens,
            num_computed: 0,
            blocks: Vec::new(),
            promised: 0,
            hashes: Vec::new(),
            cached_tokens: 0,
            max_total,
            // The whole room (no max_tokens): reserving it could take the entire cache.
            reserve_in_steps: max_total > max_seq_len,
            stopping: p.stopping,
            want_prompt_logprobs: p.sampling.prompt_logprobs,
            sampler: Sampler::resumed(p.sampling, drawn).with_guide(req.guide),
            tx: req.tx,
            arrival: req.arrival,
            scheduled_at: None,
            first_token_at: None,
            prompt_logprobs: Vec::new(),
        };
        self.sched.waiting.push_back(seq);
    }

    fn forget(&self, id: &str) {
        if let Ok(mut live) = self.status.live.lock() {
            live.remove(id);
        }
    }

    fn drop_disconnected(&mut self) {
        let gone: Vec<String> = self
            .sched
            .running
            .iter()
            .chain(self.sched.waiting.iter())
            .filter(|s| s.tx.is_closed())
            .map(|s| s.id.clone())
            .collect();
        for id in gone {
            self.sched.remove(&id);
            self.forget(&id);
            tracing::debug!(request_id = %id, "client went away; request aborted");
        }
    }

    fn fail_all(&mut self, why: &str) {
        let ids: Vec<String> = self
            .sched
            .running
            .iter()
            .chain(self.sched.waiting.iter())
            .map(|s| s.id.clone())
            .collect();
        for id in ids {
            if let Some(seq) = self.sched.remove(&id) {
                let _ = seq.tx.send(TokenEvent::Error(why.to_string()));
                self.forget(&id);
            }
        }
        self.publish_load();
    }

    fn publish_load(&mut self) {
        let changes = self.sched.blocks.take_cache_changes();
        if !changes.is_empty() {
            let last_id = self
                .status
                .kv_events
                .lock()
                .ok()
                .and_then(|mut log| log.record(&changes).then(|| log.last_id()));
            if let Some(id) = last_id {
                self.status.kv_event_id.send_replace(id);
            }
        }
        let bm = &self.sched.blocks;
        let load = LoadStats {
            running: self.sched.running.len() as u32,
            queued: self.sched.waiting.len() as u32,
            kv_blocks_used: (bm.num_blocks() - bm.num_unpromised_free()) as u64,
            kv_blocks_free: bm.num_unpromised_free() as u64,
            preemptions: self.sched.preemptions,
            prefix_cache_queries: self.sched.prefix_cache_queries,
            prefix_cache_hits: self.sched.prefix_cache_hits,
            iterations: self.sched.iterations,
            iteration_tokens: self.sched.iteration_tokens,
            steps: self.steps,
            spec_draft_tokens: self.spec.as_ref().map_or(0, |s| s.drafted),
            spec_accepted_tokens: self.spec.as_ref().map_or(0, |s| s.accepted),
        };
        if let Ok(mut l) = self.status.load.lock() {
            *l = load;
        }
    }

    /// Runs one iteration; Err carries the reason the backend can take no further steps.
    fn step(&mut self) -> Result<(), String> {
        let started = Instant::now();
        self.propose_drafts();
        let plan = self.sched.schedule();
        for seq in std::mem::take(&mut self.sched.out_of_room) {
            self.finish_event(&seq, FinishReason::Length, None);
            self.forget(&seq.id);
        }
        let since_last_step = self.last_step_end.map(|t| started - t);
        if plan.is_empty() {
            if self.sched.running.is_empty() {
                // Nothing running and the head cannot be admitted: it can never fit.
                if let Some(seq) = self.sched.waiting.pop_front() {
                    let _ = seq.tx.send(TokenEvent::Refused(
                        "the request does not fit in the KV cache; lower max_tokens or raise kv_cache_config.max_tokens".into(),
                    ));
                    self.forget(&seq.id);
                }
            }
            return Ok(());
        }
        super::fault::before_step();
        if let Err(e) = self.draft_with_model(&plan) {
            return self.fail_planned(&plan, e);
        }
        // A sequence with drafts computes its last token and the drafts: they are not in
        // `tokens` yet, so its chunk is staged in a buffer of its own.
        let staged: Vec<Option<Vec<u32>>> = plan
            .iter()
            .map(|item| {
                let s = &self.sched.running[item.seq];
                (!s.draft.is_empty()).then(|| {
                    let mut t = vec![s.tokens[s.num_computed]];
                    t.extend(&s.draft);
                    t
                })
            })
            .collect();
        let chunks: Vec<SeqChunk<'_>> = plan
            .iter()
            .zip(&staged)
            .map(|(item, staged)| {
                let s = &self.sched.running[item.seq];
                let end = s.num_computed + item.n;
                let logits = if staged.is_some()
                    || (s.want_prompt_logprobs && s.num_computed < s.prompt_len)
                {
                    LogitsWanted::All
                } else if end == s.tokens.len() {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                };
                SeqChunk {
                    tokens: match staged {
                        Some(t) => t,
                        None => &s.tokens[s.num_computed..end],
                    },
                    start_pos: s.num_computed,
                    block_table: &s.blocks,
                    logits,
                }
            })
            .collect();
        let (ctx_reqs, ctx_tokens, gen_tokens) = plan_counts(&plan, &self.sched);
        // When every sampled sequence takes the plain argmax, the backend picks the tokens
        // (on the device for CUDA) instead of returning whole logits rows.
        let greedy = chunks.iter().zip(&plan).all(|(c, item)| match c.logits {
            LogitsWanted::None => true,
            LogitsWanted::Last => takes_plain_argmax(&self.sched.running[item.seq]),
            LogitsWanted::All => false,
        });
        let forward_start = Instant::now();
        let result = if greedy {
            self.backend.forward_greedy(&chunks).and_then(|tokens| {
                let missing = tokens.len() != chunks.len()
                    || chunks
                        .iter()
                        .zip(&tokens)
                        .any(|(c, t)| c.logits == LogitsWanted::Last && t.is_none());
                if missing {
                    return Err(BackendError::InvalidStep(
                        "the backend returned no greedy token for a chunk that wanted one".into(),
                    ));
                }
                Ok(tokens.into_iter().map(ChunkOut::Token).collect())
            })
        } else {
            self.backend
                .forward(&chunks)
                .map(|r| r.into_iter().map(ChunkOut::Rows).collect())
        };
        self.last_contact = Instant::now();
        let forward_time = self.last_contact - forward_start;
        if let Some(spec) = self.spec.as_mut()
            && ctx_tokens == 0
            && staged.iter().any(Option::is_some)
        {
            spec.record_verify_time(forward_time);
        }
        drop(chunks);
        drop(staged);
        match result {
            Ok(outs) => self.after_step(&plan, outs),
            Err(e) => self.fail_planned(&plan, e)?,
        }
        self.iter += 1;
        self.steps.observe(
            started.elapsed().as_micros() as u64,
            plan.len() as u64,
            plan.iter().map(|p| p.n as u64).sum(),
        );
        if self.print_iter_log {
            let bm = &self.sched.blocks;
            tracing::info!(
                "iter = {}, host_step_time = {:.3}ms, forward_time = {:.3}ms, since_last_step = {:.3}ms, num_scheduled_requests: {}, states = {{'num_ctx_requests': {}, 'num_ctx_tokens': {}, 'num_generation_tokens': {}}}, running = {}, queued = {}, kv_blocks_used = {}, kv_blocks_free = {}",
                self.iter,
                started.elapsed().as_secs_f64() * 1e3,
                forward_time.as_secs_f64() * 1e3,
                since_last_step.map_or(0.0, |d| d.as_secs_f64() * 1e3),
                plan.len(),
                ctx_reqs,
                ctx_tokens,
                gen_tokens,
                self.sched.running.len(),
                self.sched.waiting.len(),
                bm.num_blocks() - bm.num_unpromised_free(),
                bm.num_unpromised_free()
            );
        }
        self.last_step_end = Some(Instant::now());
        Ok(())
    }

    /// Ends the planned requests of a step that failed with `e`; Err when the backend can
    /// take no further steps.
    fn fail_planned(&mut self, plan: &[PlanItem], e: BackendError) -> Result<(), String> {
        if e.is_fatal() {
            return Err(e.to_string());
        }
        tracing::error!(error = %e, "forward step failed; failing its requests");
        let ids: Vec<String> = plan
            .iter()
            .map(|i| self.sched.running[i.seq].id.clone())
            .collect();
        for id in ids {
            if let Some(seq) = self.sched.remove(&id) {
                let _ = seq
                    .tx
                    .send(TokenEvent::Error(format!("engine step failed: {e}")));
                self.forget(&id);
            }
        }
        Ok(())
    }

    fn after_step(&mut self, plan: &[PlanItem], outs: Vec<ChunkOut>) {
        let vocab = self.info.vocab_size as usize;
        // Owned: verifying drafts below needs the whole runner.
        let eos = &self.info.eos_token_ids.clone();
        let mut done: Vec<(usize, Result<Stopped, String>)> = Vec::new();
        // Sequences whose next token comes from their logits row, and those that have it.
        let mut to_sample: Vec<(usize, Vec<f32>)> = Vec::new();
        let mut picked: Vec<(usize, u32, Option<TokenLogprob>)> = Vec::new();
        for (item, out) in plan.iter().zip(outs) {
            if !self.sched.running[item.seq].draft.is_empty() {
                let ended = match out {
                    ChunkOut::Rows(rows) => self.verify_drafts(item.seq, rows),
                    ChunkOut::Token(_) => Some(Err("the backend gave no rows to verify".into())),
                };
                done.extend(ended.map(|e| (item.seq, e)));
                continue;
            }
            let start = self.sched.running[item.seq].num_computed;
            self.sched.running[item.seq].num_computed += item.n;
            self.sched.register_full_blocks(item.seq);
            self.sched.free_out_of_window(item.seq);
            let seq = &mut self.sched.running[item.seq];
            if let ChunkOut::Rows(rows) = &out
                && seq.want_prompt_logprobs
                && start < seq.prompt_len
            {
                collect_prompt_logprobs(seq, rows, start, item.n, vocab);
                if seq.num_computed >= seq.prompt_len {
                    seq.want_prompt_logprobs = false;
                    let lps = std::mem::take(&mut seq.prompt_logprobs);
                    let _ = seq.tx.send(TokenEvent::PromptLogprobs(lps));
                }
            }
            if seq.num_computed < seq.tokens.len() {
                continue;
            }
            match out {
                ChunkOut::Rows(rows) => to_sample.push((item.seq, rows)),
                ChunkOut::Token(Some(token)) => picked.push((item.seq, token, None)),
                // A chunk that wanted no logits (step() checked the others have a token).
                ChunkOut::Token(None) => {}
            }
        }
        picked.extend(sample_rows(&mut self.sched.running, to_sample, vocab, eos));
        for (i, token, logprob) in picked {
            if let Some(s) = self.sched.running[i].spec.as_mut() {
                s.record_step(1);
            }
            match accept_token(&mut self.sched.running[i], token, logprob, eos) {
                Ok(Some(r)) => done.push((i, Ok(r))),
                Ok(None) => {}
                Err(e) => done.push((i, Err(e))),
            }
        }
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        for (i, end) in done {
            let seq = self.sched.finish(i);
            if let Some(spec) = self.spec.as_mut() {
                spec.record_finished(&seq.tokens);
            }
            match end {
                Ok((reason, stop)) => self.finish_event(&seq, reason, stop),
                Err(e) => {
                    let _ = seq.tx.send(TokenEvent::Error(e));
                }
            }
            self.forget(&seq.id);
        }
    }

    fn finish_event(&self, seq: &Sequence, reason: FinishReason, stop_token_id: Option<u32>) {
        let now = Instant::now();
        let since = |t: Option<Instant>| t.map_or(0.0, |t| (t - seq.arrival).as_secs_f64());
        let _ = seq.tx.send(TokenEvent::Finished {
            reason,
            stop_token_id,
            usage: Usage {
                prompt_tokens: seq.prompt_len as u32,
                completion_tokens: (seq.tokens.len() - seq.prompt_len) as u32,
                cached_tokens: seq.cached_tokens as u32,
            },
            timings: Timings {
                queue_s: since(seq.scheduled_at),
                ttft_s: since(seq.first_token_at),
                e2e_s: (now - seq.arrival).as_secs_f64(),
            },
            avg_decoded_tokens_per_iter: seq
                .spec
                .as_ref()
                .map(|s| s.avg_decoded_tokens_per_iter().unwrap_or(0.0)),
        });
    }
}

fn plan_counts(plan: &[PlanItem], sched: &Scheduler) -> (usize, usize, usize) {
    let (mut ctx_reqs, mut ctx_tokens, mut gen_tokens) = (0, 0, 0);
    for item in plan {
        let s = &sched.running[item.seq];
        let decode = s.num_computed + 1 == s.tokens.len() && s.num_computed >= s.prompt_len;
        if decode && item.n == 1 + s.draft.len() {
            gen_tokens += item.n;
        } else {
            ctx_reqs += 1;
            ctx_tokens += item.n;
        }
    }
    (ctx_reqs, ctx_tokens, gen_tokens)
}

fn collect_prompt_logprobs(seq: &mut Sequence, rows: &[f32], start: usize, n: usize, vocab: usize) {
    let top_n = seq.sampler.logprobs().unwrap_or(0);
    for j in 0..n {
        let pos = start + j;
        // The row at `pos` predicts token `pos + 1`; only prompt tokens are reported.
        if pos + 1 >= seq.prompt_len || rows.len() < (j + 1) * vocab {
            continue;
        }
        let lp = log_softmax(&rows[j * vocab..(j + 1) * vocab]);
        seq.prompt_logprobs
            .push(token_logprob(&lp, seq.tokens[pos + 1], top_n));
    }
}

/// What a step returned for one chunk.
enum ChunkOut {
    /// Its logits rows (`Backend::forward`).
    Rows(Vec<f32>),
    /// Its greedy next token, when it wanted logits (`Backend::forward_greedy`).
    Token(Option<u32>),
}

/// Whether `seq`'s next token is the plain argmax of its logits: a plain greedy sampler and
/// no token banned at this length (`sample_one` bans stop ids before min_tokens).
fn takes_plain_argmax(seq: &Sequence) -> bool {
    let generated = seq.tokens.len() - seq.prompt_len;
    seq.sampler.is_plain_greedy()
        && !seq.want_prompt_logprobs
        && generated >= seq.stopping.min_tokens as usize
}

/// Samples the next token of each `(sequence index, logits rows)` of a step from its last
/// row, on the rayon pool (`sampling::sample_batch`); stop ids and EOS are banned before
/// min_tokens. Each index appears at most once (a step plans one chunk per sequence).
fn sample_rows(
    running: &mut [Sequence],
    mut rows: Vec<(usize, Vec<f32>)>,
    vocab: usize,
    eos: &[u32],
) -> Vec<(usize, u32, Option<TokenLogprob>)> {
    rows.sort_by_key(|r| r.0);
    let (order, mut storage): (Vec<usize>, Vec<Vec<f32>>) = rows.into_iter().unzip();
    let mut slots = order.iter().copied().zip(storage.iter_mut()).peekable();
    let mut jobs = Vec::with_capacity(order.len());
    for (i, seq) in running.iter_mut().enumerate() {
        let Some((_, row)) = slots.next_if(|(j, _)| *j == i) else {
            continue;
        };
        let generated = seq.tokens.len() - seq.prompt_len;
        let mut banned: Vec<u32> = Vec::new();
        if generated < seq.stopping.min_tokens as usize {
            banned.extend(&seq.stopping.stop_token_ids);
            if !seq.stopping.ignore_eos {
                banned.extend(eos);
            }
        }
        let len = row.len();
        let (prompt, generated_ids) = seq.tokens.split_at(seq.prompt_len);
        jobs.push(SampleJob {
            sampler: &mut seq.sampler,
            logits: &mut row[len.saturating_sub(vocab)..],
            prompt,
            generated: generated_ids,
            banned,
        });
    }
    let samples = sample_batch(jobs);
    order
        .into_iter()
        .zip(samples)
        .map(|(i, (token, logprob))| (i, token, logprob))
        .collect()
}

/// Why a sequence stopped, and the stop token that ended it, if one did.
type Stopped = (FinishReason, Option<u32>);

/// Appends `token` to `seq`, sends it, and says whether the sequence is done: a stop token,
/// a complete grammar (`stop`) or the length limit. Err: the grammar failed.
fn accept_token(
    seq: &mut Sequence,
    token: u32,
    logprob: Option<TokenLogprob>,
    eos: &[u32],
) -> Result<Option<Stopped>, String> {
    seq.tokens.push(token);
    if seq.first_token_at.is_none() {
        seq.first_token_at = Some(Instant::now());
    }
    let is_stop = seq.stopping.stop_token_ids.contains(&token)
        || (!seq.stopping.ignore_eos && eos.contains(&token));
    if is_stop {
        return Ok(Some((FinishReason::Stop, Some(token))));
    }
    let complete = seq.sampler.advance_guide(token)?;
    let logprobs: Vec<TokenLogprob> = logprob.into_iter().collect();
    let _ = seq.tx.send(TokenEvent::Tokens {
        ids: vec![token],
        logprobs,
    });
    if complete {
        return Ok(Some((FinishReason::Stop, None)));
    }
    Ok((seq.tokens.len() >= seq.max_total).then_some((FinishReason::Length, None)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefill_budget_defaults_by_backend_and_never_exceeds_max_num_tokens() {
        let cfg = EngineConfig {
            max_num_tokens: 8192,
            ..Default::default()
        };
        assert_eq!(
            prefill_budget(&cfg, "cpu"),
            crate::engine::CPU_PREFILL_TOKEN_BUDGET
        );
        assert_eq!(prefill_budget(&cfg, "cuda"), 8192);
        let set = EngineConfig {
            prefill_token_budget: Some(2000),
            ..cfg.clone()
        };
        assert_eq!(prefill_budget(&set, "cpu"), 2000);
        assert_eq!(prefill_budget(&set, "cuda"), 2000);
        let small = EngineConfig {
            max_num_tokens: 256,
            ..cfg
        };
        assert_eq!(prefill_budget(&small, "cpu"), 256);
    }
}
