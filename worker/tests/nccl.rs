//! The NCCL communicator: what runs without a GPU (a missing libnccl is a clear error, never a
//! panic; the unique id travels over the TCP ring; the group selection), and GPU tests that
//! print why they are skipped where there is no GPU or NCCL. `LLMAPI_REQUIRE_NCCL=1` turns
//! those skips into failures (for a GPU machine's check script).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use support::free_port;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use half::bf16;
use llmapi_worker::backend::cuda::select::Choice;
use llmapi_worker::dist::nccl::{
    ID_BYTES, NcclComm, NcclTimeouts, check_nccl_libraries, local_readiness, nccl_version,
    new_unique_id, share_unique_id,
};
use llmapi_worker::dist::tcp::{RingConfig, TcpRing};
use llmapi_worker::dist::{CommError, CommKind, Communicator, GroupDevice, SingleRank, form_group};

fn config(rank: usize, world: usize, port: u16) -> RingConfig {
    RingConfig {
        rank,
        world_size: world,
        group: 0,
        rendezvous: format!("127.0.0.1:{port}"),
        bind: std::net::Ipv4Addr::LOCALHOST.into(),
        token: "nccl-test".into(),
        join_timeout: Duration::from_secs(20),
        op_timeout: Duration::from_secs(10),
    }
}

/// Runs `f` on every rank of a fresh TCP ring, one thread per rank; results in rank order.
fn on_ring<T: Send>(world: usize, f: impl Fn(TcpRing) -> T + Sync) -> Vec<T> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let f = &f;
                s.spawn(move || f(TcpRing::join(&config(r, world, port)).unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A stand-in for ncclGetUniqueId (test double): a fixed, recognisable pattern.
fn fake_unique_id() -> Result<[u8; ID_BYTES], String> {
    let mut id = [0u8; ID_BYTES];
    for (i, b) in id.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    Ok(id)
}

/// Skips (returns false, printing why) unless NCCL and `gpus` GPUs are usable here; with
/// LLMAPI_REQUIRE_NCCL=1 a missing piece fails the test instead.
fn gpus_ready(gpus: usize) -> bool {
    llmapi_common::telemetry::init_logging("warning", llmapi_common::telemetry::LogFormat::Text);
    let why = match local_readiness(gpus - 1) {
        Ok(()) => return true,
        Err(e) => e,
    };
    if std::env::var("LLMAPI_REQUIRE_NCCL").is_ok_and(|v| v == "1") {
        panic!("LLMAPI_REQUIRE_NCCL=1 but NCCL on {gpus} GPU(s) is not usable: {why}");
    }
    eprintln!("skipped: NCCL on {gpus} GPU(s) is not usable here: {why}");
    false
}

const CHILD: &str = "LLMAPI_NCCL_TEST_CHILD";

#[test]
fn missing_libnccl_is_a_clear_error_not_a_panic() {
    if std::env::var_os(CHILD).is_some() {
        // In the child: the loader path holds no NCCL.
        if check_nccl_libraries().is_ok() || new_unique_id().is_ok() {
            println!("NCCL_ON_SYSTEM_PATH");
            return;
        }
        let err = check_nccl_libraries().unwrap_err();
        assert!(err.contains("libnccl"), "{err}");
        assert!(err.contains("LD_LIBRARY_PATH"), "{err}");
        let err = new_unique_id().unwrap_err();
        assert!(err.contains("libnccl"), "{err}");
        let bootstrap = NcclComm::bootstrap(Box::new(SingleRank), 0, NcclTimeouts::default());
        match bootstrap {
            Err(CommError::Nccl { rank: 0, message }) => {
                assert!(message.contains("ranks [0] cannot run NCCL"), "{message}");
                assert!(message.contains("libnccl"), "{message}");
                println!("CHILD_OK: {message}");
            }
            other => panic!("expected an NCCL error, got {other:?}"),
        }
        return;
    }
    // Re-run this test in a child whose loader path is an empty directory, so that a libnccl
    // found through this process's LD_LIBRARY_PATH is hidden too.
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "missing_libnccl_is_a_clear_error_not_a_panic",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .env("LD_LIBRARY_PATH", empty.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    if stdout.contains("NCCL_ON_SYSTEM_PATH") {
        eprintln!("skipped: libnccl is installed on the system loader path, it cannot be hidden");
        return;
    }
    assert!(stdout.contains("CHILD_OK"), "child ran no check:\n{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn unique_id_reaches_every_rank_over_the_tcp_ring() {
    let made = AtomicUsize::new(0);
    let ids = on_ring(3, |mut ring| {
        share_unique_id(&mut ring, Ok(()), || {
            made.fetch_add(1, Ordering::SeqCst);
            fake_unique_id()
        })
        .unwrap()
    });
    let expected = fake_unique_id().unwrap();
    assert!(ids.iter().all(|id| *id == expected));
    assert_eq!(made.load(Ordering::SeqCst), 1, "only rank 0 makes the id");
}

#[test]
fn a_rank_that_cannot_run_nccl_fails_every_rank_naming_it() {
    let results = on_ring(3, |mut ring| {
        let ready = if ring.rank() == 2 {
            Err("libnccl missing (test)".to_owned())
        } else {
            Ok(())
        };
        share_unique_id(&mut ring, ready, fake_unique_id)
    });
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Err(CommError::Nccl { rank: got, message }) => {
                assert_eq!(got, rank);
                assert!(message.contains("ranks [2] cannot run NCCL"), "{message}");
                assert_eq!(message.contains("libnccl missing (test)"), rank == 2);
            }
            other => panic!("rank {rank}: expected an NCCL error, got {other:?}"),
        }
    }
}

#[test]
fn rank_0_failing_to_make_the_id_fails_every_rank_with_its_reason() {
    let results = on_ring(2, |mut ring| {
        share_unique_id(&mut ring, Ok(()), || {
            Err("no network interface (test)".into())
        })
    });
    for r in results {
        let err = r.unwrap_err().to_string();
        assert!(
            err.contains("rank 0 could not create the NCCL unique id: no network interface (test)"),
            "{err}"
        );
    }
}

#[test]
fn real_nccl_unique_id_travels_over_the_ring() {
    if let Err(e) = new_unique_id() {
        eprintln!("skipped: libnccl is not loadable here: {e}");
        return;
    }
    let version = nccl_version().unwrap();
    assert!(
        version >= 21400,
        "NCCL {version} is older than 2.14 (non-blocking init)"
    );
    eprintln!("libnccl version code {version}");
    let ids = on_ring(2, |mut ring| {
        share_unique_id(&mut ring, Ok(()), new_unique_id).unwrap()
    });
    assert_eq!(ids[0], ids[1]);
    assert!(
        ids[0].iter().any(|b| *b != 0),
        "an NCCL id is not all zeros"
    );
}

#[test]
fn groups_use_the_tcp_ring_on_cpu_and_nccl_on_cuda() {
    assert_eq!(GroupDevice::Cpu.comm_kind(), CommKind::TcpRing);
    assert_eq!(GroupDevice::for_backend(Choice::Cpu, 3), GroupDevice::Cpu);
    assert_eq!(
        GroupDevice::for_backend(Choice::Cuda, 3),
        GroupDevice::Cuda { local_gpu: 3 }
    );
    assert_eq!(
        GroupDevice::Cuda { local_gpu: 1 }.comm_kind(),
        CommKind::Nccl
    );
    let port = free_port();
    let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|r| {
                s.spawn(move || {
                    let mut comm = form_group(&config(r, 2, port), GroupDevice::Cpu).unwrap();
                    let mut buf = vec![r as f32 + 1.0; 5];
                    comm.all_reduce_sum(&mut buf).unwrap();
                    buf
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(sums.iter().all(|b| b == &vec![3.0; 5]));
}

#[test]
fn a_cuda_group_without_nccl_fails_on_every_rank_without_hanging() {
    if local_readiness(1).is_ok() {
        eprintln!("skipped: NCCL and two GPUs are usable here (the GPU tests cover this machine)");
        return;
    }
    let port = free_port();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|r| {
                s.spawn(move || {
                    form_group(&config(r, 2, port), GroupDevice::Cuda { local_gpu: r }).map(|_| ())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, r) in results.into_iter().enumerate() {
        let err = r.unwrap_err().to_string();
        assert!(err.contains(&format!("rank {rank}:")), "{err}");
        assert!(err.contains("cannot run NCCL"), "{err}");
    }
}

fn assert_host_collectives(comm: &mut dyn Communicator) {
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut buf: Vec<f32> = (0..1001).map(|i| i as f32 * 0.5 + rank as f32).collect();
    comm.all_reduce_sum(&mut buf).unwrap();
    let rank_sum = (0..world).sum::<usize>() as f32;
    for (i, v) in buf.iter().enumerate() {
        assert_eq!(*v, i as f32 * 0.5 * world as f32 + rank_sum);
    }
    let local: Vec<f32> = (0..7).map(|i| (rank * 100 + i) as f32).collect();
    let mut out = vec![0.0; 7 * world];
    comm.all_gather(&local, &mut out).unwrap();
    for r in 0..world {
        for i in 0..7 {
            assert_eq!(out[r * 7 + i], (r * 100 + i) as f32);
        }
    }
    let mut bytes: Vec<u8> = if rank == 0 {
        b"plan from the leader".to_vec()
    } else {
        vec![0; 20]
    };
    comm.broadcast(&mut bytes, 0).unwrap();
    assert_eq!(&bytes, b"plan from the leader");
    comm.barrier().unwrap();
    let mut wrong = vec![0.0; 3];
    assert!(matches!(
        comm.all_gather(&local, &mut wrong),
        Err(CommError::Usage { .. })
    ));
}

fn assert_device_collectives(comm: &mut NcclComm) {
    let (rank, world) = (comm.rank(), comm.world_size());
    let stream = comm.stream().clone();
    let host: Vec<f32> = (0..513).map(|i| i as f32 + rank as f32).collect();
    let mut dev = stream.clone_htod(&host).unwrap();
    comm.all_reduce_sum_dev(&mut dev).unwrap();
    let back = stream.clone_dtoh(&dev).unwrap();
    let rank_sum = (0..world).sum::<usize>() as f32;
    for (i, v) in back.iter().enumerate() {
        assert_eq!(*v, i as f32 * world as f32 + rank_sum);
    }
    // bf16: small integers are exact.
    let host: Vec<bf16> = (0..64).map(|i| bf16::from_f32((i % 8) as f32)).collect();
    let mut dev = stream.clone_htod(&host).unwrap();
    comm.all_reduce_sum_dev(&mut dev).unwrap();
    let back = stream.clone_dtoh(&dev).unwrap();
    for (i, v) in back.iter().enumerate() {
        assert_eq!(v.to_f32(), ((i % 8) * world) as f32);
    }
    let local = stream.clone_htod(&[rank as f32; 4]).unwrap();
    let mut out = stream.alloc_zeros::<f32>(4 * world).unwrap();
    comm.all_gather_dev(&local, &mut out).unwrap();
    let back = stream.clone_dtoh(&out).unwrap();
    for r in 0..world {
        assert_eq!(&back[r * 4..(r + 1) * 4], &[r as f32; 4]);
    }
    let mut b = stream.clone_htod(&[rank as f32 + 10.0; 3]).unwrap();
    comm.broadcast_dev(&mut b, world - 1).unwrap();
    assert_eq!(stream.clone_dtoh(&b).unwrap(), vec![world as f32 + 9.0; 3]);
    // The raw-address all-reduce the CUDA backend calls through the trait (and SharedComm).
    let host: Vec<f32> = (0..300).map(|i| (i + rank) as f32).collect();
    let dev = stream.clone_htod(&host).unwrap();
    stream.synchronize().unwrap();
    let addr = {
        use cudarc::driver::DevicePtr;
        dev.device_ptr(&stream).0
    };
    let as_trait: &mut dyn Communicator = comm;
    assert!(as_trait.moves_device_memory());
    // SAFETY: `dev` holds 300 f32 on this communicator's GPU, written and synchronized above,
    // and is not used until the call returns.
    unsafe { as_trait.all_reduce_sum_device(addr, host.len()) }.unwrap();
    let back = stream.clone_dtoh(&dev).unwrap();
    for (i, v) in back.iter().enumerate() {
        assert_eq!(*v, i as f32 * world as f32 + rank_sum);
    }
}

#[test]
fn host_communicators_refuse_device_buffers_with_an_error() {
    let mut single = SingleRank;
    assert!(!single.moves_device_memory());
    // SAFETY: a host-only communicator refuses before touching the address.
    let e = unsafe { single.all_reduce_sum_device(0, 4) }
        .unwrap_err()
        .to_string();
    assert!(e.contains("host memory only"), "{e}");
    let mut shared = llmapi_worker::dist::SharedComm::new(Box::new(SingleRank));
    assert!(!shared.moves_device_memory());
    // SAFETY: as above; SharedComm forwards to SingleRank.
    assert!(unsafe { shared.all_reduce_sum_device(0, 4) }.is_err());
}

#[test]
fn gpu_world_1_collectives_are_the_identity() {
    if !gpus_ready(1) {
        return;
    }
    let mut comm = NcclComm::bootstrap(Box::new(SingleRank), 0, NcclTimeouts::default()).unwrap();
    assert_host_collectives(&mut comm);
    assert_device_collectives(&mut comm);
}

#[test]
fn gpu_world_2_collectives_agree_across_two_gpus() {
    if !gpus_ready(2) {
        return;
    }
    on_ring(2, |ring| {
        let gpu = ring.rank();
        let mut comm = NcclComm::bootstrap(Box::new(ring), gpu, NcclTimeouts::default()).unwrap();
        assert_host_collectives(&mut comm);
        assert_device_collectives(&mut comm);
    });
}

#[test]
fn gpu_a_dead_peer_fails_the_collective_naming_it() {
    if !gpus_ready(2) {
        return;
    }
    let timeouts = NcclTimeouts {
        init: Duration::from_secs(60),
        op: Duration::from_secs(5),
    };
    let results = on_ring(2, |ring| {
        let gpu = ring.rank();
        let mut comm = NcclComm::bootstrap(Box::new(ring), gpu, timeouts).unwrap();
        if gpu == 1 {
            // Rank 1 leaves: its communicator is aborted and its ring connections close.
            drop(comm);
            return None;
        }
        let mut buf = vec![1.0f32; 16];
        Some(comm.all_reduce_sum(&mut buf))
    });
    let err = results[0]
        .as_ref()
        .unwrap()
        .as_ref()
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank 0"), "{err}");
    assert!(err.contains("rank 1"), "{err}");
}
