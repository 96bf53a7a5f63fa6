//! A ring of TCP connections: rank r sends to rank r+1 and receives from rank r-1.
//!
//! Forming the ring: the leader (rank 0) listens on the rendezvous address; every other rank
//! connects, presents the group token, its rank and the port of its own ring listener, and
//! receives the table of all ring addresses. Each rank then connects to its successor and
//! accepts its predecessor. All-reduce is the bandwidth-optimal ring algorithm
//! (reduce-scatter, then all-gather: each rank moves 2 (n-1)/n of the buffer).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::{CommError, Communicator};

const MAGIC: &[u8; 4] = b"LLMR";
const VERSION: u32 = 1;

/// How to join a ring.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// This rank.
    pub rank: usize,
    /// Ranks in the group.
    pub world_size: usize,
    /// The leader's rendezvous address, `host:port`; the leader listens on it.
    pub rendezvous: String,
    /// Shared secret of the job; a rank presenting another token is refused.
    pub token: String,
    /// How long to wait for the whole group to form.
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
        let deadline = Instant::now() + cfg.join_timeout;
        let ring_listener = TcpListener::bind(("0.0.0.0", 0)).map_err(|e| fail(e.to_string()))?;
        let ring_port = ring_listener
            .local_addr()
            .map_err(|e| fail(e.to_string()))?
            .port();

        let table = if rank == 0 {
            lead_rendezvous(cfg, ring_port, deadline).map_err(fail)?
        } else {
            join_rendezvous(cfg, ring_port, deadline).map_err(fail)?
        };

        let next_rank = (rank + 1) % cfg.world_size;
        let prev_rank = (rank + cfg.world_size - 1) % cfg.world_size;
        let mut next = connect_until(&table[next_rank], deadline).map_err(|e| {
            fail(format!(
                "cannot reach rank {next_rank} at {}: {e}",
                table[next_rank]
            ))
        })?;
        write_hello(&mut next, &cfg.token, rank).map_err(|e| fail(e.to_string()))?;
        let prev = accept_until(&ring_listener, deadline, |s| {
            let (token, from) = read_hello(s)?;
            if token != cfg.token || from != prev_rank {
                return Err(std::io::Error::other(format!(
                    "ring peer presented rank {from} (expected {prev_rank}) or a wrong token"
                )));
            }
            Ok(())
        })
        .map_err(|e| fail(format!("rank {prev_rank} did not connect: {e}")))?;
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

fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to no address")))
}

fn connect_until(addr: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    loop {
        let attempt = resolve(addr).and_then(|a| {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10));
            TcpStream::connect_timeout(&a, left.min(Duration::from_secs(2)))
        });
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn accept_until(
    listener: &TcpListener,
    deadline: Instant,
    mut check: impl FnMut(&mut TcpStream) -> std::io::Result<()>,
) -> std::io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                match check(&mut s) {
                    Ok(()) => return Ok(s),
                    Err(e) => refused(&e),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(std::io::Error::new(ErrorKind::TimedOut, "timed out"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Refused connections are dropped and waiting goes on: a stray client must not break a group.
fn refused(e: &std::io::Error) {
    tracing::warn!(error = %e, "refused a ring connection");
}

fn write_hello(s: &mut TcpStream, token: &str, rank: usize) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(16 + token.len());
    msg.extend_from_slice(MAGIC);
    msg.extend_from_slice(&VERSION.to_le_bytes());
    msg.extend_from_slice(&(rank as u32).to_le_bytes());
    msg.extend_from_slice(&(token.len() as u32).to_le_bytes());
    msg.extend_from_slice(token.as_bytes());
    s.write_all(&msg)
}

fn read_u32(s: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_hello(s: &mut TcpStream) -> std::io::Result<(String, usize)> {
    let mut magic = [0u8; 4];
    s.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(std::io::Error::other("not an llmapi ring peer"));
    }
    let version = read_u32(s)?;
    if version != VERSION {
        return Err(std::io::Error::other(format!(
            "peer speaks ring protocol {version}, this build {VERSION}: run the same llmapi version on every rank"
        )));
    }
    let rank = read_u32(s)? as usize;
    let len = read_u32(s)? as usize;
    if len > 4096 {
        return Err(std::io::Error::other("token too long"));
    }
    let mut token = vec![0u8; len];
    s.read_exact(&mut token)?;
    Ok((String::from_utf8_lossy(&token).into_owned(), rank))
}

/// Leader side: collect every rank's ring address, then send everyone the table.
fn lead_rendezvous(
    cfg: &RingConfig,
    ring_port: u16,
    deadline: Instant,
) -> Result<Vec<String>, String> {
    let listener = TcpListener::bind(&cfg.rendezvous).map_err(|e| {
        format!("cannot listen: {e} (is another group using this --rendezvous_port?)")
    })?;
    let host = cfg
        .rendezvous
        .rsplit_once(':')
        .map(|(h, _)| h.to_owned())
        .unwrap_or_else(|| cfg.rendezvous.clone());
    let mut table: Vec<Option<String>> = vec![None; cfg.world_size];
    table[0] = Some(format!("{host}:{ring_port}"));
    let mut peers = Vec::new();
    while peers.len() + 1 < cfg.world_size {
        let joined: Vec<usize> = (0..cfg.world_size)
            .filter(|r| table[*r].is_some())
            .collect();
        let s = accept_until(&listener, deadline, |s| {
            let (token, rank) = read_hello(s)?;
            if token != cfg.token {
                return Err(std::io::Error::other("wrong group token"));
            }
            if rank == 0 || rank >= cfg.world_size || joined.contains(&rank) {
                return Err(std::io::Error::other(format!(
                    "rank {rank} is out of range or already joined"
                )));
            }
            let port = read_u32(s)? as u16;
            let ip: IpAddr = s.peer_addr()?.ip();
            table[rank] = Some(SocketAddr::new(ip, port).to_string());
            Ok(())
        })
        .map_err(|e| {
            let missing: Vec<usize> = (0..cfg.world_size)
                .filter(|r| table[*r].is_none())
                .collect();
            format!("ranks {missing:?} did not join: {e}")
        })?;
        peers.push(s);
    }
    let table: Vec<String> = table.into_iter().map(Option::unwrap_or_default).collect();
    let mut msg = Vec::new();
    for entry in &table {
        msg.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        msg.extend_from_slice(entry.as_bytes());
    }
    for mut p in peers {
        p.write_all(&msg)
            .map_err(|e| format!("cannot send the ring table: {e}"))?;
    }
    Ok(table)
}

/// Follower side: present ourselves to the leader and read the table.
fn join_rendezvous(
    cfg: &RingConfig,
    ring_port: u16,
    deadline: Instant,
) -> Result<Vec<String>, String> {
    let mut s =
        connect_until(&cfg.rendezvous, deadline).map_err(|e| format!("leader unreachable: {e}"))?;
    write_hello(&mut s, &cfg.token, cfg.rank).map_err(|e| e.to_string())?;
    s.write_all(&u32::from(ring_port).to_le_bytes())
        .map_err(|e| e.to_string())?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
    let mut table = Vec::with_capacity(cfg.world_size);
    for _ in 0..cfg.world_size {
        let len =
            read_u32(&mut s).map_err(|e| format!("no ring table from the leader: {e}"))? as usize;
        let mut b = vec![0u8; len.min(256)];
        s.read_exact(&mut b).map_err(|e| e.to_string())?;
        table.push(String::from_utf8_lossy(&b).into_owned());
    }
    Ok(table)
}
