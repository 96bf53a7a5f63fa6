//! The ring's rendezvous against strangers on the network: a rank without the job secret
//! cannot join or take an honest rank's place, a second claim to a rank is refused by name, a
//! client that drips one byte at a time holds up nobody and cannot stretch formation past its
//! deadline, a rank that never comes is named, and a group on one machine listens on
//! 127.0.0.1 only. (A stranger on a ring listener: `dist::rendezvous`'s unit tests.)

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use support::free_port;

use std::collections::HashSet;
use std::io::Write;
use std::net::{Ipv4Addr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use llmapi_worker::dist::tcp::{RingConfig, TcpRing};
use llmapi_worker::dist::{CommError, Communicator};

fn config(rank: usize, world: usize, port: u16, token: &str, timeout: Duration) -> RingConfig {
    RingConfig {
        rank,
        world_size: world,
        group: 0,
        rendezvous: format!("127.0.0.1:{port}"),
        bind: Ipv4Addr::LOCALHOST.into(),
        token: token.into(),
        join_timeout: timeout,
        op_timeout: Duration::from_secs(5),
    }
}

/// Joins as `rank` and, once the ring formed, all-reduces the rank numbers.
fn form(
    rank: usize,
    world: usize,
    port: u16,
    token: &str,
    timeout: Duration,
) -> Result<f32, CommError> {
    TcpRing::join(&config(rank, world, port, token, timeout)).map(|mut r| sum_of_ranks(&mut r))
}

/// Every rank's all-reduce of its own rank number, which is 0 + 1 + ... + (world - 1) on
/// every rank of a ring the honest ranks formed.
fn sum_of_ranks(ring: &mut TcpRing) -> f32 {
    let mut v = [ring.rank() as f32];
    ring.all_reduce_sum(&mut v).unwrap();
    v[0]
}

#[test]
fn a_rank_with_a_wrong_secret_is_refused_and_the_honest_ranks_still_form_the_group() {
    let port = free_port();
    let t = Duration::from_secs(20);
    std::thread::scope(|s| {
        let leader = s.spawn(|| form(0, 3, port, "job", t));
        std::thread::sleep(Duration::from_millis(200));
        // First to arrive, claiming rank 1 with everything public right and a guessed secret.
        let stranger = TcpRing::join(&config(1, 3, port, "guess", t)).unwrap_err();
        assert!(
            stranger.to_string().contains("job secret differs"),
            "{stranger}"
        );
        let honest: Vec<_> = (1..3)
            .map(|r| s.spawn(move || form(r, 3, port, "job", t)))
            .collect();
        for h in honest {
            assert_eq!(h.join().unwrap().unwrap(), 3.0);
        }
        assert_eq!(leader.join().unwrap().unwrap(), 3.0);
    });
}

#[test]
fn a_second_authenticated_claim_to_a_rank_is_refused_naming_the_rank() {
    let port = free_port();
    let t = Duration::from_secs(20);
    std::thread::scope(|s| {
        let leader = s.spawn(|| form(0, 3, port, "job", t));
        let first = s.spawn(|| form(1, 3, port, "job", t));
        std::thread::sleep(Duration::from_millis(500));
        let second = TcpRing::join(&config(1, 3, port, "job", t))
            .unwrap_err()
            .to_string();
        assert!(
            second.contains("rank 1 of group 0 already joined"),
            "{second}"
        );
        let last = s.spawn(|| form(2, 3, port, "job", t));
        for h in [leader, first, last] {
            assert_eq!(h.join().unwrap().unwrap(), 3.0);
        }
    });
}

/// Connects to `port` and sends the start of a greeting one byte every `every`, until
/// `stop` or the other side closes.
fn drip(port: u16, every: Duration, stop: &AtomicBool) {
    let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    let greeting = b"LLMR\x02\x00\x00\x00\x01";
    for b in greeting.iter().cycle() {
        if stop.load(Ordering::SeqCst) || c.write_all(&[*b]).is_err() {
            return;
        }
        std::thread::sleep(every);
    }
}

#[test]
fn a_slow_drip_client_does_not_hold_up_the_honest_ranks() {
    let port = free_port();
    let t = Duration::from_secs(30);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let leader = s.spawn(|| form(0, 3, port, "job", t));
        std::thread::sleep(Duration::from_millis(200));
        let dripper = s.spawn(|| drip(port, Duration::from_secs(1), &stop));
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let honest: Vec<_> = (1..3)
            .map(|r| s.spawn(move || form(r, 3, port, "job", t)))
            .collect();
        for h in honest {
            assert_eq!(h.join().unwrap().unwrap(), 3.0);
        }
        assert_eq!(leader.join().unwrap().unwrap(), 3.0);
        // Less than the 5 s a stranger is given to prove itself: nobody waited on the drip.
        let formed = started.elapsed();
        stop.store(true, Ordering::SeqCst);
        dripper.join().unwrap();
        assert!(formed < Duration::from_secs(4), "formation took {formed:?}");
    });
}

#[test]
fn a_slow_drip_client_does_not_stretch_formation_past_its_deadline() {
    let port = free_port();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let started = Instant::now();
        let leader = s.spawn(|| TcpRing::join(&config(0, 2, port, "job", Duration::from_secs(2))));
        std::thread::sleep(Duration::from_millis(100));
        // Several drippers, each byte well within any per-read timeout.
        let drippers: Vec<_> = (0..3)
            .map(|_| s.spawn(|| drip(port, Duration::from_millis(300), &stop)))
            .collect();
        let err = leader.join().unwrap().unwrap_err().to_string();
        let took = started.elapsed();
        stop.store(true, Ordering::SeqCst);
        for d in drippers {
            d.join().unwrap();
        }
        assert!(
            took < Duration::from_secs(3),
            "the leader gave up after {took:?}"
        );
        assert!(
            err.contains("rank 1 of group 0 never joined the rendezvous"),
            "{err}"
        );
    });
}

#[test]
fn a_rank_that_never_comes_is_named_within_the_deadline_on_every_rank() {
    let port = free_port();
    let t = Duration::from_secs(2);
    let started = Instant::now();
    std::thread::scope(|s| {
        let leader = s.spawn(|| TcpRing::join(&config(0, 3, port, "job", t)));
        std::thread::sleep(Duration::from_millis(100));
        let follower = s.spawn(|| TcpRing::join(&config(1, 3, port, "job", t)));
        let leader = leader.join().unwrap().unwrap_err().to_string();
        let follower = follower.join().unwrap().unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(4));
        let want =
            format!("rank 2 of group 0 never joined the rendezvous at 127.0.0.1:{port} within 2 s");
        assert!(leader.contains(&want), "{leader}");
        assert!(follower.contains(&want), "{follower}");
        assert!(leader.contains("LLMAPI_JOB_TOKEN"), "{leader}");
    });
}

#[test]
fn a_leader_that_never_comes_is_named() {
    let port = free_port();
    let err = TcpRing::join(&config(1, 2, port, "job", Duration::from_millis(800)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "rank 0 of group 0 (its leader) never opened the rendezvous at 127.0.0.1:{port}"
        )),
        "{err}"
    );
}

/// Local addresses of the listening TCP sockets of this process, from /proc.
fn listening_addresses() -> Vec<String> {
    let inodes: HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect();
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is f[1], st f[3] (0A: LISTEN), inode f[9].
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                out.push(f[1].to_owned());
            }
        }
    }
    out
}

#[test]
fn a_group_on_one_machine_listens_on_127_0_0_1_only() {
    let port = free_port();
    let t = Duration::from_secs(20);
    std::thread::scope(|s| {
        let ranks: Vec<_> = (0..2)
            .map(|r| s.spawn(move || form(r, 3, port, "job", t)))
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        // Ranks 0 and 1 wait for rank 2: the rendezvous and two ring listeners are open.
        let listening = listening_addresses();
        assert!(listening.len() >= 3, "{listening:?}");
        for a in &listening {
            // 127.0.0.1 as /proc/net/tcp writes it; any tcp6 or other address fails.
            assert!(
                a.starts_with("0100007F:"),
                "a listener on {a}: {listening:?}"
            );
        }
        assert!(
            TcpStream::connect(("127.0.0.2", port)).is_err(),
            "the rendezvous answers on another local address"
        );
        let last = form(2, 3, port, "job", t);
        assert_eq!(last.unwrap(), 3.0);
        for h in ranks {
            assert_eq!(h.join().unwrap().unwrap(), 3.0);
        }
    });
}
