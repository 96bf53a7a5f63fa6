//! Forming a ring: the leader's rendezvous, and the authenticated links between neighbours.
//!
//! Every connection is authenticated with `handshake` before it counts. The leader assigns
//! ranks from authenticated claims only: a connection that does not prove the job secret
//! within `HANDSHAKE_TIMEOUT` is dropped and takes nobody's place, and a second authenticated
//! claim to a rank is refused naming the rank. Handshakes run each on its own thread (at most
//! `MAX_PENDING` at once per listener), so a peer that sends a byte now and then cannot hold
//! up the others, and everything is bounded by one deadline for the whole formation.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::handshake::{
    self, Claim, GroupKey, HANDSHAKE_TIMEOUT, HandshakeError, Proven, Purpose, Sealed,
};
use super::tcp::RingConfig;
use super::{CommError, span};

/// Most handshakes in flight on one listener; connections beyond it are closed at once.
const MAX_PENDING: usize = 64;
/// Longest ring address in the table.
const MAX_ENTRY: usize = 256;

/// A connection to a listener whose connecting side proved the job secret.
pub(crate) struct Arrival {
    /// The connection, blocking, handshake done up to the listener's answer.
    pub stream: TcpStream,
    /// The claim, to be answered.
    pub proven: Proven,
    /// Where it came from.
    pub peer: SocketAddr,
}

/// Accepts connections and handshakes each on its own thread, handing out those that prove
/// the secret; the others are dropped (and logged) without blocking anyone.
pub(crate) struct Acceptor {
    listener: TcpListener,
    key: GroupKey,
    purpose: Purpose,
    server: Arc<str>,
    pending: Arc<AtomicUsize>,
    tx: Sender<Arrival>,
    rx: Receiver<Arrival>,
}

/// Counts a handshake thread out however it ends.
struct PendingSlot(Arc<AtomicUsize>);

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Acceptor {
    /// Serves `purpose` handshakes on `listener` as `server` (the name the connecting side
    /// proves it meant to reach).
    pub(crate) fn new(
        listener: TcpListener,
        key: &GroupKey,
        purpose: Purpose,
        server: &str,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let (tx, rx) = mpsc::channel();
        Ok(Self {
            listener,
            key: key.clone(),
            purpose,
            server: server.into(),
            pending: Arc::new(AtomicUsize::new(0)),
            tx,
            rx,
        })
    }

    /// The next authenticated arrival, or None once `deadline` passes or `stop` is set.
    pub(crate) fn next(&mut self, deadline: Instant, stop: &AtomicBool) -> Option<Arrival> {
        loop {
            self.accept_waiting(deadline);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || stop.load(Ordering::SeqCst) {
                return None;
            }
            match self.rx.recv_timeout(left.min(Duration::from_millis(5))) {
                Ok(arrival) => return Some(arrival),
                Err(RecvTimeoutError::Timeout) => {}
                // Unreachable while self.tx lives; wait out the deadline rather than spin.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(left),
            }
        }
    }

    fn accept_waiting(&self, deadline: Instant) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => self.handshake_later(stream, peer, deadline),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Out of descriptors or a connection reset before accept: keep serving.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a ring connection failed");
                    return;
                }
            }
        }
    }

    fn handshake_later(&self, mut stream: TcpStream, peer: SocketAddr, deadline: Instant) {
        if self.pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%peer, limit = MAX_PENDING, "too many unfinished ring handshakes; closing this connection");
            return;
        }
        let slot = PendingSlot(Arc::clone(&self.pending));
        let (key, purpose, server, tx) = (
            self.key.clone(),
            self.purpose,
            Arc::clone(&self.server),
            self.tx.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("ring-handshake".into())
            .spawn(move || {
                let _slot = slot;
                let peer_deadline = deadline.min(Instant::now() + HANDSHAKE_TIMEOUT);
                let proven = stream
                    .set_nonblocking(false)
                    .map_err(HandshakeError::from)
                    .and_then(|()| {
                        handshake::challenge(&mut stream, &key, purpose, &server, peer_deadline)
                    });
                match proven {
                    // The receiver is gone once the group formed: the connection just closes.
                    Ok(proven) => {
                        let _ = tx.send(Arrival {
                            stream,
                            proven,
                            peer,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "dropped a ring connection that did not authenticate")
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(%peer, error = %e, "cannot start a handshake thread; closing this connection");
        }
    }
}

fn rendezvous_error(cfg: &RingConfig, message: String) -> CommError {
    CommError::Rendezvous {
        rank: cfg.rank,
        address: cfg.rendezvous.clone(),
        message,
    }
}

fn encode_table(table: &[String]) -> Vec<u8> {
    let mut out = (table.len() as u32).to_le_bytes().to_vec();
    for entry in table {
        out.extend_from_slice(&(entry.len() as u16).to_le_bytes());
        out.extend_from_slice(entry.as_bytes());
    }
    out
}

fn decode_table(bytes: &[u8], world: usize) -> Option<Vec<String>> {
    let (count, mut rest) = bytes.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*count) as usize != world {
        return None;
    }
    let mut table = Vec::with_capacity(world);
    for _ in 0..world {
        let (len, tail) = rest.split_first_chunk::<2>()?;
        let len = u16::from_le_bytes(*len) as usize;
        if len > MAX_ENTRY || tail.len() < len {
            return None;
        }
        table.push(String::from_utf8(tail[..len].to_vec()).ok()?);
        rest = &tail[len..];
    }
    rest.is_empty().then_some(table)
}

/// The ring address a follower's rendezvous claim stands for: `:port` is the address it
/// connected from.
fn claimed_address(claim: &str, peer: SocketAddr) -> Result<String, String> {
    let parsed: Option<SocketAddr> = match claim.strip_prefix(':') {
        Some(port) => port.parse().ok().map(|p| SocketAddr::new(peer.ip(), p)),
        None => claim.parse().ok(),
    };
    parsed
        .map(|a| a.to_string())
        .ok_or_else(|| format!("the claimed ring address '{claim}' is not ip:port or :port"))
}

/// Leader side: collects every rank's authenticated claim and sends everyone the table.
pub(crate) fn lead(
    cfg: &RingConfig,
    key: &GroupKey,
    own_entry: String,
    deadline: Instant,
) -> Result<Vec<String>, CommError> {
    let port = cfg
        .rendezvous
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .ok_or_else(|| {
            rendezvous_error(
                cfg,
                "the rendezvous address has no port; give it as host:port".into(),
            )
        })?;
    let listener = TcpListener::bind((cfg.bind, port)).map_err(|e| {
        rendezvous_error(
            cfg,
            format!(
                "cannot listen on {}: {e} (is another group using this --rendezvous_port?)",
                SocketAddr::new(cfg.bind, port)
            ),
        )
    })?;
    let mut acceptor = Acceptor::new(listener, key, Purpose::Rendezvous, LEADER)
        .map_err(|e| rendezvous_error(cfg, e.to_string()))?;
    let mut table: Vec<Option<String>> = vec![None; cfg.world_size];
    table[0] = Some(own_entry);
    let mut joined: Vec<(usize, TcpStream, handshake::Session)> = Vec::new();
    while joined.len() + 1 < cfg.world_size {
        let Some(mut arrival) = acceptor.next(deadline, &AtomicBool::new(false)) else {
            let missing: Vec<usize> = (0..cfg.world_size)
                .filter(|r| table[*r].is_none())
                .collect();
            let err = CommError::NeverJoined {
                rank: cfg.rank,
                group: cfg.group,
                missing,
                address: cfg.rendezvous.clone(),
                timeout: cfg.join_timeout,
            };
            let why = err.to_string();
            for (_, mut stream, session) in joined {
                let soon = Instant::now() + Duration::from_secs(1);
                let _ = session.send(&mut stream, Sealed::Failed, why.as_bytes(), soon);
            }
            return Err(err);
        };
        let rank = arrival.proven.claim.rank;
        let verdict = if rank == 0 || rank >= cfg.world_size {
            Err(format!(
                "rank {rank} is not a follower rank of group {} (1..{}): check the task's rank and --tp_size",
                cfg.group, cfg.world_size
            ))
        } else if let Some(at) = &table[rank] {
            Err(format!(
                "rank {rank} of group {} already joined from {at}; two processes were given rank {rank}",
                cfg.group
            ))
        } else {
            claimed_address(&arrival.proven.claim.address, arrival.peer)
        };
        let answer_by = deadline.min(Instant::now() + HANDSHAKE_TIMEOUT);
        match verdict {
            Ok(address) => {
                let peer = arrival.peer;
                match arrival
                    .proven
                    .answer(&mut arrival.stream, Ok(()), answer_by)
                {
                    Ok(session) => {
                        tracing::info!(rank, %peer, ring = %address, "a rank joined the rendezvous");
                        table[rank] = Some(address);
                        joined.push((rank, arrival.stream, session));
                    }
                    Err(e) => {
                        tracing::warn!(rank, %peer, error = %e, "a rank left during its handshake")
                    }
                }
            }
            Err(why) => {
                tracing::warn!(rank, peer = %arrival.peer, reason = %why, "refused an authenticated rendezvous claim");
                let _ = arrival
                    .proven
                    .answer(&mut arrival.stream, Err(&why), answer_by);
            }
        }
    }
    let table: Vec<String> = table.into_iter().map(Option::unwrap_or_default).collect();
    let payload = encode_table(&table);
    for (rank, mut stream, session) in joined {
        session
            .send(&mut stream, Sealed::Table, &payload, deadline)
            .map_err(|e| {
                rendezvous_error(
                    cfg,
                    format!(
                        "rank {rank} left before the group formed (sending it the ring table: {e})"
                    ),
                )
            })?;
    }
    Ok(table)
}

/// How both sides name the leader's listener in the rendezvous MACs.
const LEADER: &str = "rank 0: the leader";

/// Follower side: proves this rank to the leader, checks the leader's proof, and waits for
/// the table.
pub(crate) fn follow(
    cfg: &RingConfig,
    key: &GroupKey,
    own_address: String,
    deadline: Instant,
) -> Result<Vec<String>, CommError> {
    let fail = |m: String| rendezvous_error(cfg, m);
    let claim = Claim {
        rank: cfg.rank,
        address: own_address,
    };
    let mut last_error = String::from("nothing answered");
    let (mut stream, session) = loop {
        if Instant::now() >= deadline {
            tracing::warn!(rendezvous = %cfg.rendezvous, last_error = %last_error, "the leader never answered");
            return Err(CommError::NeverJoined {
                rank: cfg.rank,
                group: cfg.group,
                missing: vec![0],
                address: cfg.rendezvous.clone(),
                timeout: cfg.join_timeout,
            });
        }
        let mut stream = match connect_until(&cfg.rendezvous, deadline) {
            Ok(s) => s,
            Err(e) => {
                last_error = e.to_string();
                continue;
            }
        };
        match handshake::connect(
            &mut stream,
            key,
            Purpose::Rendezvous,
            LEADER,
            &claim,
            deadline,
        ) {
            Ok(session) => break (stream, session),
            Err(HandshakeError::NotAuthenticated) => {
                return Err(fail(format!(
                    "the leader refused this rank's proof: this rank's job secret differs from the leader's (give every rank of the job the same LLMAPI_JOB_TOKEN or LLMAPI_JOB_TOKEN_FILE), or the leader runs another group (this rank has --tp_size {} and meets at {}; the leader's differ)",
                    cfg.world_size, cfg.rendezvous
                )));
            }
            Err(HandshakeError::BadProof) => {
                return Err(fail(
                    "the process listening there did not prove it knows the job secret: it is not this group's leader (another job on this port, or an impostor); refusing to join it".into(),
                ));
            }
            Err(HandshakeError::Refused(why)) => {
                return Err(fail(format!("the leader refused this rank: {why}")));
            }
            Err(e @ HandshakeError::Protocol(_)) => return Err(fail(e.to_string())),
            // The leader may be restarting its listener: try again while time is left.
            Err(e) => {
                last_error = e.to_string();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let max = 4 + cfg.world_size * (2 + MAX_ENTRY);
    match session.receive(&mut stream, max, deadline) {
        Ok((Sealed::Table, bytes)) => decode_table(&bytes, cfg.world_size)
            .ok_or_else(|| fail("the leader sent a malformed ring table".into())),
        Ok((Sealed::Failed, why)) => Err(fail(format!(
            "the leader gave up: {}",
            String::from_utf8_lossy(&why)
        ))),
        Err(HandshakeError::TimedOut) => Err(fail(format!(
            "the leader accepted rank {} but the group did not form within {}; the leader's log names the ranks that did not join",
            cfg.rank,
            span(cfg.join_timeout)
        ))),
        Err(e) => Err(fail(format!("no ring table from the leader: {e}"))),
    }
}

/// Connects this rank to its successor's ring listener and accepts its predecessor, both
/// authenticated with the table's identities; returns (to successor, from predecessor).
pub(crate) fn link(
    cfg: &RingConfig,
    key: &GroupKey,
    listener: TcpListener,
    table: &[String],
    deadline: Instant,
) -> Result<(TcpStream, TcpStream), CommError> {
    let (rank, world) = (cfg.rank, cfg.world_size);
    let prev = (rank + world - 1) % world;
    let fail = |m: String| rendezvous_error(cfg, m);
    let mut acceptor = Acceptor::new(listener, key, Purpose::Ring, &ring_identity(table, rank))
        .map_err(|e| fail(e.to_string()))?;
    let gave_up = AtomicBool::new(false);
    std::thread::scope(|s| {
        let from_prev =
            s.spawn(|| accept_predecessor(&mut acceptor, table, prev, cfg, deadline, &gave_up));
        let to_next = connect_successor(cfg, key, table, deadline);
        // This rank cannot join the ring: stop waiting for the predecessor too.
        if to_next.is_err() {
            gave_up.store(true, Ordering::SeqCst);
        }
        let from_prev = from_prev
            .join()
            .map_err(|_| fail("the ring accept thread panicked".into()))
            .and_then(|r| r);
        Ok((to_next?, from_prev?))
    })
}

/// How both sides of a ring link name rank `r`'s listener.
fn ring_identity(table: &[String], r: usize) -> String {
    format!("rank {r} at {}", table[r])
}

fn accept_predecessor(
    acceptor: &mut Acceptor,
    table: &[String],
    prev: usize,
    cfg: &RingConfig,
    deadline: Instant,
    stop: &AtomicBool,
) -> Result<TcpStream, CommError> {
    loop {
        let Some(mut arrival) = acceptor.next(deadline, stop) else {
            return Err(rendezvous_error(
                cfg,
                format!(
                    "rank {prev} (ring address {}) did not connect to this rank's ring listener within the {} formation deadline",
                    table[prev],
                    span(cfg.join_timeout)
                ),
            ));
        };
        let claim = &arrival.proven.claim;
        let verdict = if claim.rank == prev && claim.address == table[prev] {
            Ok(())
        } else {
            Err(format!(
                "this ring listener takes rank {prev} at {} only, not rank {} at {}",
                table[prev], claim.rank, claim.address
            ))
        };
        let answer_by = deadline.min(Instant::now() + HANDSHAKE_TIMEOUT);
        let peer = arrival.peer;
        match verdict {
            Ok(()) => match arrival
                .proven
                .answer(&mut arrival.stream, Ok(()), answer_by)
            {
                Ok(_) => return Ok(arrival.stream),
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "the predecessor left during its handshake")
                }
            },
            Err(why) => {
                tracing::warn!(%peer, reason = %why, "refused an authenticated ring connection");
                let _ = arrival
                    .proven
                    .answer(&mut arrival.stream, Err(&why), answer_by);
            }
        }
    }
}

fn connect_successor(
    cfg: &RingConfig,
    key: &GroupKey,
    table: &[String],
    deadline: Instant,
) -> Result<TcpStream, CommError> {
    let next = (cfg.rank + 1) % cfg.world_size;
    let fail = |m: String| {
        rendezvous_error(
            cfg,
            format!("cannot link to rank {next} at {}: {m}", table[next]),
        )
    };
    let claim = Claim {
        rank: cfg.rank,
        address: table[cfg.rank].clone(),
    };
    let server = ring_identity(table, next);
    loop {
        let mut stream = connect_until(&table[next], deadline).map_err(|e| fail(e.to_string()))?;
        match handshake::connect(&mut stream, key, Purpose::Ring, &server, &claim, deadline) {
            Ok(_) => return Ok(stream),
            Err(e @ (HandshakeError::Io(_) | HandshakeError::TimedOut))
                if Instant::now() < deadline =>
            {
                tracing::debug!(error = %e, "ring link failed; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(fail(e.to_string())),
        }
    }
}

/// Connects to `addr` (each address it resolves to in turn), retrying until `deadline`: the
/// other side may not listen yet.
fn connect_until(addr: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let per_try = left.clamp(Duration::from_millis(10), Duration::from_secs(2));
        let attempt = addr.to_socket_addrs().and_then(|addrs| {
            let mut last = std::io::Error::other(format!("{addr} resolves to no address"));
            for a in addrs {
                match TcpStream::connect_timeout(&a, per_try) {
                    Ok(s) => return Ok(s),
                    Err(e) => last = e,
                }
            }
            Err(last)
        });
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Whether `host:port` resolves to a loopback address, for checking that a group bound to
/// loopback also meets on loopback.
pub(crate) fn resolves_to_loopback(addr: &str) -> bool {
    addr.to_socket_addrs()
        .map(|mut a| a.any(|a| a.ip().is_loopback()))
        .unwrap_or(false)
}

/// The ring address other ranks reach this rank's listener at, given what it binds.
pub(crate) fn ring_entry(bind: IpAddr, rendezvous_host: &str, port: u16) -> String {
    if bind.is_unspecified() {
        format!("{rendezvous_host}:{port}")
    } else {
        SocketAddr::new(bind, port).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::Ipv4Addr;

    fn cfg(rank: usize, world: usize) -> RingConfig {
        RingConfig {
            rank,
            world_size: world,
            group: 0,
            rendezvous: "127.0.0.1:1".into(),
            bind: Ipv4Addr::LOCALHOST.into(),
            token: "secret".into(),
            join_timeout: Duration::from_secs(10),
            op_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn tables_round_trip_and_bad_ones_are_refused() {
        let t = vec!["127.0.0.1:5".to_owned(), "[::1]:6".to_owned()];
        assert_eq!(decode_table(&encode_table(&t), 2), Some(t.clone()));
        assert_eq!(decode_table(&encode_table(&t), 3), None);
        let mut long = encode_table(&t);
        long.push(0);
        assert_eq!(decode_table(&long, 2), None);
    }

    #[test]
    fn a_port_only_claim_takes_the_peer_address() {
        let peer: SocketAddr = "10.1.2.3:999".parse().unwrap();
        assert_eq!(claimed_address(":4000", peer).unwrap(), "10.1.2.3:4000");
        assert_eq!(
            claimed_address("127.0.0.1:4000", peer).unwrap(),
            "127.0.0.1:4000"
        );
        assert!(claimed_address("nonsense", peer).is_err());
    }

    /// A stranger who knows everything public about the group (its ranks, the table, the
    /// protocol) but not the secret connects to rank 1's ring listener before rank 0 does
    /// and claims to be rank 0: it is refused, and the link formed is rank 0's.
    #[test]
    fn a_stranger_cannot_take_the_predecessors_place_on_a_ring_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port1 = listener.local_addr().unwrap().port();
        let table = vec!["127.0.0.1:7".to_owned(), format!("127.0.0.1:{port1}")];
        let key = GroupKey::new(b"secret", 2, "127.0.0.1:1");
        let deadline = Instant::now() + Duration::from_secs(10);
        let rank1 = cfg(1, 2);
        let mut acceptor =
            Acceptor::new(listener, &key, Purpose::Ring, &ring_identity(&table, 1)).unwrap();
        std::thread::scope(|s| {
            let accepted = s.spawn(|| {
                accept_predecessor(
                    &mut acceptor,
                    &table,
                    0,
                    &rank1,
                    deadline,
                    &AtomicBool::new(false),
                )
            });
            // The stranger: the right claim and listener name, a guessed secret.
            let guess = GroupKey::new(b"guess", 2, "127.0.0.1:1");
            let mut stranger = TcpStream::connect(("127.0.0.1", port1)).unwrap();
            let claim = Claim {
                rank: 0,
                address: table[0].clone(),
            };
            let r = handshake::connect(
                &mut stranger,
                &guess,
                Purpose::Ring,
                &ring_identity(&table, 1),
                &claim,
                deadline,
            );
            assert!(matches!(r, Err(HandshakeError::NotAuthenticated)), "{r:?}");
            // A client of the old protocol, sending its token in the clear, gets nowhere.
            let mut old = TcpStream::connect(("127.0.0.1", port1)).unwrap();
            let mut hello = b"LLMR".to_vec();
            hello.extend_from_slice(&1u32.to_le_bytes());
            hello.extend_from_slice(&0u32.to_le_bytes());
            old.write_all(&hello).unwrap();
            // The honest rank 0.
            let mut honest = connect_successor(&cfg(0, 2), &key, &table, deadline).unwrap();
            let mut link = accepted.join().unwrap().unwrap();
            honest.write_all(b"x").unwrap();
            let mut got = [0u8; 1];
            link.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"x", "the accepted link is rank 0's");
            let mut rest = Vec::new();
            old.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = old.read_to_end(&mut rest);
            assert!(
                rest.len() < 12,
                "the old client got a greeting and nothing more"
            );
        });
    }

    /// A rank that is right about the secret but claims another rank's place on a ring
    /// listener is refused by name.
    #[test]
    fn a_ring_listener_takes_only_its_predecessor() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let table: Vec<String> = (0..3)
            .map(|r| {
                if r == 1 {
                    format!("127.0.0.1:{port}")
                } else {
                    format!("127.0.0.1:{}", 7 + r)
                }
            })
            .collect();
        let key = GroupKey::new(b"secret", 3, "127.0.0.1:1");
        let deadline = Instant::now() + Duration::from_millis(1500);
        let mut acceptor =
            Acceptor::new(listener, &key, Purpose::Ring, &ring_identity(&table, 1)).unwrap();
        std::thread::scope(|s| {
            let accepted = s.spawn(|| {
                accept_predecessor(
                    &mut acceptor,
                    &table,
                    0,
                    &cfg(1, 3),
                    deadline,
                    &AtomicBool::new(false),
                )
            });
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let claim = Claim {
                rank: 2,
                address: table[2].clone(),
            };
            let r = handshake::connect(
                &mut c,
                &key,
                Purpose::Ring,
                &ring_identity(&table, 1),
                &claim,
                deadline,
            );
            match r {
                Err(HandshakeError::Refused(why)) => assert!(why.contains("rank 0"), "{why}"),
                other => panic!("expected a refusal, got {other:?}"),
            }
            let err = accepted.join().unwrap().unwrap_err().to_string();
            assert!(err.contains("rank 0"), "{err}");
        });
    }
}
