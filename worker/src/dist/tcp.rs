//! A ring of TCP connections: rank r sends to rank r+1 and receives from rank r-1.
//!
//! Forming the ring (`rendezvous`): the leader (rank 0) listens on the rendezvous address;
//! every other rank connects and proves, by a challenge-response over the job secret
//! (`handshake`; the secret never crosses the wire), which rank it is and where its own ring
//! listener is; the leader proves itself in return and, once every rank has joined, sends the
//! table of all ring addresses. Each rank then links to its successor and accepts its
//! predecessor, both links authenticated the same way. All of it is bounded by one deadline.
//! All-reduce is the bandwidth-optimal ring algorithm (reduce-scatter, then all-gather: each
//! rank moves 2 (n-1)/n of the buffer). Ring traffic itself is not encrypted.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::handshake::GroupKey;
use super::rendezvous;
use super::{CommError, Communicator};

/// How to join a ring.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// This rank.
    pub rank: usize,
    /// Ranks in the group.
    pub world_size: usize,
    /// Which group of the job this is; named in errors only.
    pub group: usize,
    /// The leader's rendezvous address, `host:port`; the leader listens on its port.
    pub rendezvous: String,
    /// The address this rank's listeners (the leader's rendezvous, every rank's ring
    /// listener) bind: 127.0.0.1 for a group on one machine, this node's advertised address
    /// for a group across nodes, 0.0.0.0 (every interface) where that is not known.
    pub bind: IpAddr,
    /// Shared secret of the job; every connection proves it without sending it.
    pub token: String,
    /// How long the whole group may take to form; every wait of the formation ends by then.
    pub join_timeout: Duration,
    /// How long any single collective may wait on a peer.
    pub op_timeout: Duration,
}

/// A formed ring.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world: usize,
    /// Stream to rank + 1 (we write).
    next: Option<TcpStream>,
    /// Stream from rank - 1 (we read).
    prev: Option<TcpStream>,
    op_timeout: Duration,
    scratch: Vec<f32>,
}

impl TcpRing {
    /// Joins the group; blocks until every rank has joined or `join_timeout` passes.
    pub fn join(cfg: &RingConfig) -> Result<Self, CommError> {
        let rank = cfg.rank;
        let fail = |message: String| CommError::Rendezvous {
            rank,
            address: cfg.rendezvous.clone(),
            message,
        };
        if cfg.world_size == 0 || rank >= cfg.world_size {
            return Err(fail(format!(
                "rank {rank} is outside a group of {}",
                cfg.world_size
            )));
        }
        let mut ring = Self {
            rank,
            world: cfg.world_size,
            next: None,
            prev: None,
            op_timeout: cfg.op_timeout,
            scratch: Vec::new(),
        };
        if cfg.world_size == 1 {
            return Ok(ring);
        }
        if cfg.token.is_empty() {
            return Err(fail(
                "the group has no secret; set LLMAPI_JOB_TOKEN or LLMAPI_JOB_TOKEN_FILE (the same on every rank)".into(),
            ));
        }
        if cfg.bind.is_loopback() && !rendezvous::resolves_to_loopback(&cfg.rendezvous) {
            return Err(fail(format!(
                "this group binds {} (one machine) but meets at {}, which is not a loopback address; a group on one machine meets at 127.0.0.1",
                cfg.bind, cfg.rendezvous
            )));
        }
        let deadline = Instant::now() + cfg.join_timeout;
        let key = GroupKey::new(cfg.token.as_bytes(), cfg.world_size, &cfg.rendezvous);
        let ring_listener = TcpListener::bind((cfg.bind, 0)).map_err(|e| {
            fail(format!(
                "cannot open this rank's ring listener on {}: {e}",
                cfg.bind
            ))
        })?;
        let ring_port = ring_listener
            .local_addr()
            .map_err(|e| fail(e.to_string()))?
            .port();

        let table = if rank == 0 {
            let host = cfg
                .rendezvous
                .rsplit_once(':')
                .map_or(cfg.rendezvous.as_str(), |(h, _)| h);
            let own = rendezvous::ring_entry(cfg.bind, host, ring_port);
            rendezvous::lead(cfg, &key, own, deadline)?
        } else {
            // Bound to every interface: the leader records the address this rank comes from.
            let own = if cfg.bind.is_unspecified() {
                format!(":{ring_port}")
            } else {
                SocketAddr::new(cfg.bind, ring_port).to_string()
            };
            rendezvous::follow(cfg, &key, own, deadline)?
        };
        let (next, prev) = rendezvous::link(cfg, &key, ring_listener, &table, deadline)?;
        for s in [&next, &prev] {
            s.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
            s.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
        }
        ring.next = Some(next);
        ring.prev = Some(prev);
        Ok(ring)
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn io_error(&self, e: std::io::Error, peer: usize, op: &'static str) -> CommError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => CommError::Timeout {
                rank: self.rank,
                peer,
                timeout: self.op_timeout,
                op,
            },
            _ => CommError::PeerLost {
                rank: self.rank,
                peer,
                op,
                message: e.to_string(),
            },
        }
    }

    /// Sends `out` to the successor while receiving `input.len()` bytes from the predecessor.
    /// Both sockets are non-blocking and serviced in one loop, so a ring where every rank
    /// sends at once cannot deadlock on full socket buffers.
    fn exchange(
        &mut self,
        out: &[u8],
        input: &mut [u8],
        op: &'static str,
    ) -> Result<(), CommError> {
        let (next_rank, prev_rank) = (self.next_rank(), self.prev_rank());
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Ok(());
        };
        let deadline = Instant::now() + self.op_timeout;
        let (mut sent, mut received) = (0, 0);
        let mut idle_rounds = 0u32;
        while sent < out.len() || received < input.len() {
            let mut progress = false;
            if sent < out.len() {
                match next.write(&out[sent..]) {
                    Ok(n) => {
                        sent += n;
                        progress = n > 0;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(self.io_error(e, next_rank, op)),
                }
            }
            if received < input.len() {
                match prev.read(&mut input[received..]) {
                    Ok(0) => {
                        let eof =
                            std::io::Error::new(ErrorKind::UnexpectedEof, "connection closed");
                        return Err(self.io_error(eof, prev_rank, op));
                    }
                    Ok(n) => {
                        received += n;
                        progress = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(self.io_error(e, prev_rank, op)),
                }
            }
            if progress {
                idle_rounds = 0;
                continue;
            }
            idle_rounds += 1;
            if Instant::now() >= deadline {
                let peer = if received < input.len() {
                    prev_rank
                } else {
                    next_rank
                };
                let late = std::io::Error::new(ErrorKind::TimedOut, "timed out");
                return Err(self.io_error(late, peer, op));
            }
            // Spin briefly for low latency on small messages, then back off.
            if idle_rounds < 200 {
                std::hint::spin_loop();
            } else if idle_rounds < 2000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        Ok(())
    }

    fn chunk_range(len: usize, parts: usize, i: usize) -> std::ops::Range<usize> {
        let base = len / parts;
        let extra = len % parts;
        let start = i * base + i.min(extra);
        start..start + base + usize::from(i < extra)
    }
}

impl Communicator for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        let n = self.world;
        if n == 1 || buf.is_empty() {
            return Ok(());
        }
        let r = self.rank;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(buf.len() / n + 1, 0.0);
        // Reduce-scatter: after n-1 steps rank r holds the full sum of chunk (r + 1) % n.
        for step in 0..n - 1 {
            let send = Self::chunk_range(buf.len(), n, (r + n - step) % n);
            let recv = Self::chunk_range(buf.len(), n, (r + 2 * n - step - 1) % n);
            let incoming = &mut scratch[..recv.len()];
            let result = self.exchange(
                bytemuck::cast_slice(&buf[send]),
                bytemuck::cast_slice_mut(incoming),
                "all_reduce",
            );
            if let Err(e) = result {
                self.scratch = scratch;
                return Err(e);
            }
            for (dst, src) in buf[recv].iter_mut().zip(incoming.iter()) {
                *dst += *src;
            }
        }
        // All-gather of the reduced chunks.
        for step in 0..n - 1 {
            let send = Self::chunk_range(buf.len(), n, (r + 1 + n - step) % n);
            let recv = Self::chunk_range(buf.len(), n, (r + n - step) % n);
            let out: Vec<u8> = bytemuck::cast_slice(&buf[send]).to_vec();
            let result =
                self.exchange(&out, bytemuck::cast_slice_mut(&mut buf[recv]), "all_reduce");
            if let Err(e) = result {
                self.scratch = scratch;
                return Err(e);
            }
        }
        self.scratch = scratch;
        Ok(())
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        let (n, r, len) = (self.world, self.rank, local.len());
        if out.len() != n * len {
            return Err(CommError::Usage {
                rank: r,
                message: format!(
                    "all_gather output holds {} values, expected {}",
                    out.len(),
                    n * len
                ),
            });
        }
        out[r * len..(r + 1) * len].copy_from_slice(local);
        for step in 0..n.saturating_sub(1) {
            let send = (r + n - step) % n;
            let recv = (r + 2 * n - step - 1) % n;
            // send != recv for n > 1: split the buffer so both blocks borrow without a copy.
            let (src, dst) = if send < recv {
                let (a, b) = out.split_at_mut(recv * len);
                (&a[send * len..(send + 1) * len], &mut b[..len])
            } else {
                let (a, b) = out.split_at_mut(send * len);
                (&b[..len], &mut a[recv * len..(recv + 1) * len])
            };
            self.exchange(
                bytemuck::cast_slice(src),
                bytemuck::cast_slice_mut(dst),
                "all_gather",
            )?;
        }
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        if self.world == 1 {
            return Ok(());
        }
        if root >= self.world {
            return Err(CommError::Usage {
                rank: self.rank,
                message: format!("broadcast root {root} is outside a group of {}", self.world),
            });
        }
        if self.rank != root {
            self.exchange(&[], buf, "broadcast")?;
        }
        if self.next_rank() != root {
            self.exchange(buf, &mut [], "broadcast")?;
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        let mut one = [0.0f32];
        self.all_reduce_sum(&mut one)
    }
}

impl Drop for TcpRing {
    fn drop(&mut self) {
        for s in [&self.next, &self.prev].into_iter().flatten() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}
