//! The TCP ring on loopback: collectives agree with a serial computation, and a dead rank
//! stops its group with an error that names it instead of hanging it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use support::free_port;

use std::time::{Duration, Instant};

use llmapi_worker::dist::tcp::{RingConfig, TcpRing};
use llmapi_worker::dist::{CommError, Communicator};

fn config(rank: usize, world: usize, port: u16, token: &str) -> RingConfig {
    RingConfig {
        rank,
        world_size: world,
        group: 0,
        rendezvous: format!("127.0.0.1:{port}"),
        bind: std::net::Ipv4Addr::LOCALHOST.into(),
        token: token.into(),
        join_timeout: Duration::from_secs(20),
        op_timeout: Duration::from_secs(5),
    }
}

/// Runs `f` on every rank of a fresh ring, each on its own thread; results in rank order.
fn on_ring<T: Send>(world: usize, f: impl Fn(&mut TcpRing) -> T + Sync) -> Vec<T> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let f = &f;
                s.spawn(move || {
                    let mut ring = TcpRing::join(&config(r, world, port, "job-1")).unwrap();
                    f(&mut ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 101) as f32 * 0.5 - rank as f32)
        .collect()
}

#[test]
fn all_reduce_sums_every_element_for_any_size_and_group() {
    for world in [2, 3, 4] {
        for len in [1, 3, 7, 1000, 100_003] {
            let out = on_ring(world, |ring| {
                let mut buf = input(ring.rank(), len);
                ring.all_reduce_sum(&mut buf).unwrap();
                buf
            });
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, len)).collect();
            let expected: Vec<f32> = (0..len)
                .map(|i| inputs.iter().map(|x| x[i]).sum())
                .collect();
            for (rank, got) in out.iter().enumerate() {
                for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-3 * e.abs().max(1.0),
                        "world {world} len {len} rank {rank} [{i}]: {g} vs {e}"
                    );
                }
            }
        }
    }
}

#[test]
fn all_gather_concatenates_in_rank_order() {
    let out = on_ring(3, |ring| {
        let local = vec![ring.rank() as f32; 5];
        let mut all = vec![0.0; 15];
        ring.all_gather(&local, &mut all).unwrap();
        all
    });
    let expected: Vec<f32> = (0..3).flat_map(|r| vec![r as f32; 5]).collect();
    assert!(out.iter().all(|o| *o == expected));
}

#[test]
fn broadcast_copies_the_root_buffer_everywhere() {
    let out = on_ring(4, |ring| {
        let mut buf = if ring.rank() == 2 {
            (0..3_000_000u32).map(|i| (i % 251) as u8).collect()
        } else {
            vec![0u8; 3_000_000]
        };
        ring.broadcast(&mut buf, 2).unwrap();
        ring.barrier().unwrap();
        buf
    });
    let expected: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    assert!(out.iter().all(|o| *o == expected));
}

#[test]
fn a_rank_with_the_wrong_token_cannot_join() {
    let port = free_port();
    let leader = std::thread::spawn(move || {
        let mut c = config(0, 2, port, "right");
        c.join_timeout = Duration::from_secs(3);
        TcpRing::join(&c).map(|_| ())
    });
    let mut c = config(1, 2, port, "wrong");
    c.join_timeout = Duration::from_secs(3);
    let follower = TcpRing::join(&c).unwrap_err().to_string();
    assert!(follower.contains("job secret differs"), "{follower}");
    let err = leader.join().unwrap().unwrap_err().to_string();
    assert!(
        err.contains("rank 1 of group 0 never joined the rendezvous"),
        "{err}"
    );
}

#[test]
fn a_dead_rank_fails_the_collective_and_is_named() {
    let port = free_port();
    let started = Instant::now();
    let errors = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|r| {
                s.spawn(move || -> Option<CommError> {
                    let mut ring = TcpRing::join(&config(r, 3, port, "job")).unwrap();
                    let mut buf = vec![1.0f32; 10_000];
                    ring.all_reduce_sum(&mut buf).unwrap();
                    if r == 1 {
                        return None; // rank 1 dies: its sockets close
                    }
                    ring.all_reduce_sum(&mut buf).err()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(started.elapsed() < Duration::from_secs(15), "no hang");
    // Rank 2 reads from rank 1 and names it; rank 0 sees the break through rank 2.
    let e2 = errors[2]
        .as_ref()
        .expect("rank 2's collective fails")
        .to_string();
    assert!(e2.contains("ring broken at rank 1"), "{e2}");
    let e0 = errors[0]
        .as_ref()
        .expect("rank 0's collective fails")
        .to_string();
    assert!(e0.contains("ring broken at rank"), "{e0}");
}

#[test]
fn a_single_rank_group_needs_no_network() {
    let mut ring = TcpRing::join(&config(0, 1, 1, "x")).unwrap();
    let mut buf = vec![2.0f32; 4];
    ring.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(buf, vec![2.0; 4]);
}

/// A group across nodes may bind every interface: followers then claim a port only and the
/// leader records the address each one came from.
#[test]
fn a_group_bound_to_every_interface_forms_from_the_addresses_ranks_come_from() {
    let port = free_port();
    let out = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|r| {
                s.spawn(move || {
                    let mut c = config(r, 3, port, "job-any");
                    c.bind = std::net::Ipv4Addr::UNSPECIFIED.into();
                    let mut ring = TcpRing::join(&c).unwrap();
                    let mut v = [1.0f32];
                    ring.all_reduce_sum(&mut v).unwrap();
                    v[0]
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert_eq!(out, vec![3.0; 3]);
}
