//! A tensor-parallel worker group: the leader engine schedules and sends each step's plan,
//! followers run the same forward on their shards. Ranks are threads of this test joined by
//! the real TCP ring on loopback. A group serves the same greedy tokens as one engine, stays
//! up while idle (heartbeats) and while a slow rank loads, stops its followers on shutdown,
//! and when a rank dies every request ends with an error naming it and the leader refuses
//! new work; nothing hangs.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use support::{case, free_port};

use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use llmapi_common::args::SpeculativeConfig;
use llmapi_worker::backend::Backend;
use llmapi_worker::backend::cpu::CpuBackend;
use llmapi_worker::dist::plan::{self, PlanMsg};
use llmapi_worker::dist::tcp::{RingConfig, TcpRing};
use llmapi_worker::dist::{Communicator, SharedComm};
use llmapi_worker::engine::*;
use llmapi_worker::model::{ModelWeights, Shard};
use tokio::sync::mpsc::UnboundedReceiver;

fn config() -> EngineConfig {
    EngineConfig {
        max_batch_size: 8,
        max_num_tokens: 64,
        max_seq_len: Some(128),
        tokens_per_block: 4,
        kv_dtype: KvDtype::Float32,
        kv_max_tokens: Some(1024),
        enable_chunked_prefill: true,
        threads: Some(1),
        ..Default::default()
    }
}

/// The engine's `connect` step: join the ring once the shard is loaded.
fn connect(
    rank: usize,
    world: usize,
    port: u16,
    op_timeout: Duration,
) -> impl FnOnce() -> Result<Box<dyn Communicator>, EngineError> {
    move || Ok(Box::new(ring(rank, world, port, op_timeout)) as Box<dyn Communicator>)
}

fn shard(rank: usize, tp: usize, ep: usize) -> Shard {
    Shard::new(rank, tp, ep).unwrap()
}

fn ring(rank: usize, world: usize, port: u16, op_timeout: Duration) -> TcpRing {
    TcpRing::join(&RingConfig {
        rank,
        world_size: world,
        group: 0,
        rendezvous: format!("127.0.0.1:{port}"),
        bind: std::net::Ipv4Addr::LOCALHOST.into(),
        token: "group-test".into(),
        join_timeout: Duration::from_secs(30),
        op_timeout,
    })
    .unwrap()
}

fn request(id: &str, seed: u32, len: usize, max_tokens: u32) -> GenerateParams {
    GenerateParams {
        request_id: id.into(),
        prompt: (0..len as u32)
            .map(|i| (seed * 31 + i * 17) % 250 + 3)
            .collect(),
        stopping: StoppingParams {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Token ids until Finished (Ok) or Error (Err with its message); at most 60 s.
fn collect(mut rx: UnboundedReceiver<TokenEvent>) -> Result<Vec<u32>, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ids = Vec::new();
    while Instant::now() < deadline {
        match rx.try_recv() {
            Ok(TokenEvent::Tokens { ids: new, .. }) => ids.extend(new),
            Ok(TokenEvent::Finished { .. }) => return Ok(ids),
            Ok(TokenEvent::Error(e) | TokenEvent::Refused(e)) => return Err(e),
            Ok(TokenEvent::PromptLogprobs(_)) => {}
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => return Err(format!("stream ended without Finished: {e}")),
        }
    }
    panic!("no Finished or Error event within 60 s");
}

fn serve_all(h: &EngineHandle, n: u32) -> Vec<Vec<u32>> {
    let rxs: Vec<_> = (0..n)
        .map(|i| {
            h.submit(request(&format!("r{i}"), i, 5 + 9 * i as usize, 10))
                .unwrap()
        })
        .collect();
    rxs.into_iter().map(|rx| collect(rx).unwrap()).collect()
}

/// Starts followers 1..tp on threads and the leader on this one.
fn group(
    dir: &Path,
    tp: usize,
    ep: usize,
    op_timeout: Duration,
) -> (EngineHandle, Vec<JoinHandle<Result<(), EngineError>>>) {
    group_with(dir, tp, ep, op_timeout, config())
}

/// `group` with every rank on `cfg`.
fn group_with(
    dir: &Path,
    tp: usize,
    ep: usize,
    op_timeout: Duration,
    cfg: EngineConfig,
) -> (EngineHandle, Vec<JoinHandle<Result<(), EngineError>>>) {
    let port = free_port();
    let handles = (1..tp)
        .map(|rank| {
            let dir = dir.to_path_buf();
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let join = connect(rank, tp, port, op_timeout);
                run_follower(&dir, &cfg, shard(rank, tp, ep), join)
            })
        })
        .collect();
    let join = connect(0, tp, port, op_timeout);
    let leader = Engine::start_leader(dir, cfg, shard(0, tp, ep), join).unwrap();
    (leader, handles)
}

fn join_within(handles: Vec<JoinHandle<Result<(), EngineError>>>, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    while handles.iter().any(|h| !h.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "a follower did not stop within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    handles
        .into_iter()
        .map(|h| match h.join().unwrap() {
            Ok(()) => "stopped".to_string(),
            Err(e) => e.to_string(),
        })
        .collect()
}

#[test]
fn a_group_serves_the_same_tokens_as_one_engine_and_stops_its_followers() {
    for (name, tp, ep) in [("llama", 2, 2), ("qwen3_moe", 2, 2), ("qwen3_moe", 4, 2)] {
        let dir = case(name);
        let single = Engine::start(&dir, config()).unwrap();
        let want = serve_all(&single, 4);
        single.shutdown();

        let (leader, handles) = group(&dir, tp, ep, Duration::from_secs(20));
        let got = serve_all(&leader, 4);
        assert_eq!(
            got, want,
            "{name} tp={tp} ep={ep}: group and one engine differ"
        );
        assert!(leader.failure().is_none());
        leader.shutdown();
        let ends = join_within(handles, Duration::from_secs(20));
        assert!(ends.iter().all(|e| e == "stopped"), "{ends:?}");
    }
}

#[test]
fn a_group_with_a_draft_model_on_its_leader_serves_one_engines_greedy_tokens() {
    // The draft runs whole on rank 0; its drafts reach the follower inside the verification
    // chunks of each step's plan. The model as its own draft has every draft accepted; a
    // one-layer cut has drafts rejected, which rolls back the KV of both ranks.
    let dir = case("llama");
    let cut = tempfile::tempdir().unwrap();
    llmapi_common::checkpoint::truncate::write_truncated(&dir, 1, cut.path()).unwrap();
    let reqs: Vec<GenerateParams> = (0..3)
        .map(|i| request(&format!("r{i}"), i, 6 + 11 * i as usize, 24))
        .collect();
    let run = |h: &EngineHandle| -> Vec<Vec<u32>> {
        let rxs: Vec<_> = reqs.iter().map(|r| h.submit(r.clone()).unwrap()).collect();
        rxs.into_iter().map(|rx| collect(rx).unwrap()).collect()
    };
    let single = Engine::start(&dir, config()).unwrap();
    let want = run(&single);
    single.shutdown();
    for (draft, all_accepted) in [(dir.as_path(), true), (cut.path(), false)] {
        let cfg = EngineConfig {
            speculative: Some(SpeculativeConfig::draft_target(4, draft.to_str().unwrap())),
            ..config()
        };
        let (leader, handles) = group_with(&dir, 2, 2, Duration::from_secs(20), cfg);
        let got = run(&leader);
        assert_eq!(
            got,
            want,
            "draft {}: group and one engine differ",
            draft.display()
        );
        let load = support::wait_idle(&leader);
        assert!(load.spec_draft_tokens > 0, "{load:?}");
        if all_accepted {
            assert_eq!(load.spec_accepted_tokens, load.spec_draft_tokens);
        } else {
            assert!(
                load.spec_accepted_tokens < load.spec_draft_tokens,
                "{load:?}"
            );
        }
        leader.shutdown();
        let ends = join_within(handles, Duration::from_secs(20));
        assert!(ends.iter().all(|e| e == "stopped"), "{ends:?}");
    }
}

#[test]
fn the_leaders_draft_model_counts_in_its_kv_budget() {
    // Rank 0 holds the whole draft beside its shard: the draft's weights and workspaces
    // come out of rank 0's share of the node (half of a 64 MiB cgroup limit with two ranks
    // on it), and each token of the pool costs the shard's KV bytes and the draft's.
    let dir = case("llama");
    let mem = tempfile::tempdir().unwrap();
    let cfg = |draft: bool| EngineConfig {
        max_batch_size: 1024,
        max_num_tokens: 256,
        max_seq_len: Some(256),
        kv_max_tokens: None,
        kv_memory_fraction: 0.5,
        replicas_on_node: 2,
        memory_source: support::fake_machine(mem.path(), &(64u64 << 20).to_string()),
        speculative: draft.then(|| SpeculativeConfig::draft_target(4, dir.to_str().unwrap())),
        ..config()
    };
    let whole =
        CpuBackend::new(ModelWeights::load(&dir).unwrap(), KvDtype::Float32, Some(1)).unwrap();
    let draft_per_token = whole.kv_bytes_per_token() as u64;
    let f = whole.host_footprint(256, 1024);
    let draft_model = f.weights + f.workspace;
    let shard_per_token = draft_per_token / 2;
    let tpb = config().tokens_per_block as u64;
    let pool = |draft: bool| {
        let (leader, handles) = group_with(&dir, 2, 2, Duration::from_secs(20), cfg(draft));
        let blocks = leader.info().kv_capacity_blocks;
        leader.shutdown();
        join_within(handles, Duration::from_secs(20));
        blocks
    };
    // Without a draft the pool takes half of (32 MiB - the shard's footprint).
    let plain = pool(false) * tpb * shard_per_token;
    let with_draft = pool(true) * tpb * (shard_per_token + draft_per_token);
    let want = plain.saturating_sub(draft_model / 2);
    let slack = 5 * (shard_per_token + draft_per_token) + 5 * shard_per_token;
    assert!(
        draft_model / 2 > 4 * slack,
        "the draft's footprint {draft_model} must stand out of the rounding {slack}"
    );
    assert!(
        with_draft <= want + slack && with_draft + slack > want,
        "pool with the draft {with_draft} bytes; without it {plain}, less half the draft's \
         {draft_model} is {want}"
    );
}

#[test]
fn an_idle_group_outlives_its_collective_timeout() {
    // Followers give up on a silent leader after 2 s; heartbeats keep an idle group alive.
    let dir = case("llama");
    let (leader, handles) = group(&dir, 2, 2, Duration::from_secs(2));
    std::thread::sleep(Duration::from_secs(4));
    assert!(leader.failure().is_none(), "{:?}", leader.failure());
    assert_eq!(serve_all(&leader, 1).len(), 1);
    leader.shutdown();
    let ends = join_within(handles, Duration::from_secs(20));
    assert_eq!(ends, ["stopped"]);
}

#[test]
fn a_leader_that_loads_later_than_its_followers_by_more_than_the_timeout_still_forms_the_group() {
    // Ranks join only once loaded, so the join timeout (30 s), not the collective timeout
    // (5 s here: short, yet long enough for a loaded CI machine), absorbs a leader 8 s late.
    let dir = case("llama");
    let port = free_port();
    let op_timeout = Duration::from_secs(5);
    let follower = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            run_follower(
                &dir,
                &config(),
                shard(1, 2, 2),
                connect(1, 2, port, op_timeout),
            )
        })
    };
    let late = move || {
        std::thread::sleep(Duration::from_secs(8));
        connect(0, 2, port, op_timeout)()
    };
    let leader = Engine::start_leader(&dir, config(), shard(0, 2, 2), late).unwrap();
    assert_eq!(serve_all(&leader, 2).len(), 2);
    leader.shutdown();
    assert_eq!(
        join_within(vec![follower], Duration::from_secs(20)),
        ["stopped"]
    );
}

#[test]
fn a_follower_dying_mid_run_fails_every_request_naming_it_and_nothing_hangs() {
    let dir = case("llama");
    let port = free_port();
    let op_timeout = Duration::from_secs(10);
    // Rank 1 follows for a few steps, then its thread ends and its sockets close, as when
    // its process is killed.
    let dying = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            let comm = SharedComm::new(Box::new(ring(1, 2, port, op_timeout)));
            let w = ModelWeights::load_shard(&dir, shard(1, 2, 2)).unwrap();
            let mut be =
                CpuBackend::new_sharded(w, Box::new(comm.clone()), KvDtype::Float32, Some(1))
                    .unwrap();
            let mut plan_comm: Box<dyn Communicator> = Box::new(comm);
            let mut steps = 0;
            while steps < 5 {
                match plan::recv(plan_comm.as_mut()).unwrap() {
                    PlanMsg::InitKv {
                        num_blocks,
                        tokens_per_block,
                    } => be.init_kv(num_blocks, tokens_per_block).unwrap(),
                    PlanMsg::Step(chunks) => {
                        let views: Vec<_> = chunks.iter().map(|c| c.as_chunk()).collect();
                        be.forward(&views).unwrap();
                        steps += 1;
                    }
                    PlanMsg::Heartbeat => {}
                    PlanMsg::Stop => panic!("the leader stopped before rank 1 died"),
                }
            }
        })
    };
    let leader = Engine::start_leader(
        &dir,
        config(),
        shard(0, 2, 2),
        connect(0, 2, port, op_timeout),
    )
    .unwrap();
    let started = Instant::now();
    let rxs: Vec<_> = (0..3)
        .map(|i| leader.submit(request(&format!("k{i}"), i, 6, 100)).unwrap())
        .collect();
    for rx in rxs {
        let e = collect(rx).unwrap_err();
        assert!(
            e.contains("worker group failed") && e.contains("rank 1"),
            "{e}"
        );
    }
    assert!(
        started.elapsed() < op_timeout,
        "the leader noticed the dead rank only after {:?}",
        started.elapsed()
    );
    dying.join().unwrap();
    let why = leader.failure().unwrap();
    assert!(why.contains("rank 1"), "{why}");
    let e = leader
        .submit(request("after", 1, 4, 4))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 1"), "{e}");
}

#[test]
fn a_follower_whose_leader_dies_stops_with_an_error_naming_it() {
    let dir = case("llama");
    let port = free_port();
    let follower = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            let join = connect(1, 2, port, Duration::from_secs(10));
            run_follower(&dir, &config(), shard(1, 2, 2), join)
        })
    };
    let mut leader = ring(0, 2, port, Duration::from_secs(10));
    plan::send(
        &mut leader,
        &PlanMsg::InitKv {
            num_blocks: 8,
            tokens_per_block: 4,
        },
    )
    .unwrap();
    drop(leader);
    let ends = join_within(vec![follower], Duration::from_secs(20));
    assert!(ends[0].contains("rank 0"), "{ends:?}");
}

#[test]
fn the_leader_budgets_kv_memory_per_rank() {
    // With tp=2 each rank stores half the KV heads in a pool of the same blocks; the budget
    // is one rank's share of its node (EngineConfig::replicas_on_node), so the leader counts
    // its own bytes per token, not the group's.
    let dir = case("llama");
    let whole = CpuBackend::new(ModelWeights::load(&dir).unwrap(), KvDtype::Float32, Some(1))
        .unwrap()
        .kv_bytes_per_token();
    let port = free_port();
    let follower = std::thread::spawn(move || {
        let mut comm = ring(1, 2, port, Duration::from_secs(10));
        plan::recv(&mut comm).map(|m| m == PlanMsg::Stop)
    });
    let comm = SharedComm::new(Box::new(ring(0, 2, port, Duration::from_secs(10))));
    let w = ModelWeights::load_shard(&dir, shard(0, 2, 2)).unwrap();
    let local =
        CpuBackend::new_sharded(w, Box::new(comm.clone()), KvDtype::Float32, Some(1)).unwrap();
    let per_rank = local.kv_bytes_per_token();
    assert_eq!(per_rank * 2, whole);
    let leader = plan::LeaderBackend::new(Box::new(local), Box::new(comm));
    assert_eq!(leader.kv_bytes_per_token(), per_rank);
    drop(leader);
    assert!(
        follower.join().unwrap().unwrap(),
        "the follower was told to stop"
    );
}
