//! Mutual challenge-response over the job secret, for every connection that forms a ring.
//!
//! The secret never crosses the wire. The connecting side (a rank joining the rendezvous, or a
//! rank connecting to its successor's ring listener) and the listening side each send a fresh
//! random nonce; the connecting side answers with an HMAC-SHA256 over both nonces, its claimed
//! rank and ring address, the group and the listener it meant to reach; the listening side
//! checks it (constant time) before it says or sends anything else, then proves itself with
//! its own MAC over the same facts and its verdict. Every MAC names its direction and purpose,
//! so no answer can be replayed in another connection, role or group. Later messages on the
//! connection (the ring table) carry a MAC bound to the same nonces.
//!
//! Not this module's job: deciding who may claim which rank (the rendezvous does), and
//! encryption (ring traffic after the handshake is plain TCP).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 4] = b"LLMR";
/// Version 2: the authenticated handshake (version 1 sent the token in clear).
pub(crate) const VERSION: u32 = 2;
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
/// Longest claimed ring address (`[ipv6%scope]:port` fits easily).
const MAX_ADDRESS: usize = 256;
/// Longest refusal reason.
const MAX_REASON: usize = 1024;

const ACCEPTED: u8 = 0;
const REFUSED: u8 = 1;
const NOT_AUTHENTICATED: u8 = 2;

/// Why a connection is being made; part of every MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A rank joining its leader's rendezvous.
    Rendezvous,
    /// Rank r connecting to rank r + 1's ring listener.
    Ring,
}

impl Purpose {
    fn code(self) -> u8 {
        match self {
            Self::Rendezvous => 1,
            Self::Ring => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Rendezvous),
            2 => Some(Self::Ring),
            _ => None,
        }
    }
}

/// The job secret and the facts of one group that every MAC of that group covers.
#[derive(Clone)]
pub(crate) struct GroupKey {
    mac: HmacSha256,
    group: Vec<u8>,
}

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupKey(..)")
    }
}

impl GroupKey {
    /// The key of the group of `world_size` ranks meeting at `rendezvous`, from the job
    /// secret. Ranks of another group or with another secret compute other MACs.
    pub(crate) fn new(secret: &[u8], world_size: usize, rendezvous: &str) -> Self {
        // HMAC takes keys of any length (longer ones are hashed first).
        let mac = <HmacSha256 as KeyInit>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
        let mut group = Vec::new();
        put_field(&mut group, &(world_size as u64).to_le_bytes());
        put_field(&mut group, rendezvous.as_bytes());
        Self { mac, group }
    }

    fn tag(&self, label: &str, fields: &[&[u8]]) -> HmacSha256 {
        let mut mac = self.mac.clone();
        let mut framed = Vec::new();
        put_field(&mut framed, b"llmapi ring handshake v2");
        put_field(&mut framed, label.as_bytes());
        put_field(&mut framed, &self.group);
        for f in fields {
            put_field(&mut framed, f);
        }
        mac.update(&framed);
        mac
    }

    fn sign(&self, label: &str, fields: &[&[u8]]) -> [u8; MAC_LEN] {
        self.tag(label, fields).finalize().into_bytes().into()
    }

    /// Constant-time check of `tag` against the MAC of `fields`.
    fn verify(&self, label: &str, fields: &[&[u8]], tag: &[u8]) -> bool {
        self.tag(label, fields).verify_slice(tag).is_ok()
    }
}

/// Length-prefixed, so that no two field lists frame to the same bytes.
fn put_field(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u64).to_le_bytes());
    out.extend_from_slice(field);
}

/// What the connecting side says it is: a rank and the address of its ring listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claim {
    /// The rank it claims.
    pub rank: usize,
    /// Its ring listener, as the purpose defines it (a rendezvous claim may leave the host
    /// out: `:port`, meaning "the address you see me from").
    pub address: String,
}

/// One authenticated connection: the nonces that later messages are bound to.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    key: GroupKey,
    purpose: Purpose,
    client_nonce: [u8; NONCE_LEN],
    server_nonce: [u8; NONCE_LEN],
}

/// A handshake that did not authenticate both sides.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// The socket failed or closed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The deadline passed mid-handshake.
    #[error("the peer did not complete the handshake in time")]
    TimedOut,
    /// The peer does not speak this protocol.
    #[error("{0}")]
    Protocol(String),
    /// The peer's MAC is wrong: it does not know the job secret, or belongs to another group.
    #[error("the peer did not prove it knows this job's secret")]
    BadProof,
    /// The listening side found our proof wrong.
    #[error("the peer refused this rank's proof")]
    NotAuthenticated,
    /// The listening side authenticated us and refused the claim, saying why.
    #[error("{0}")]
    Refused(String),
}

fn fresh_nonce() -> Result<[u8; NONCE_LEN], HandshakeError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| {
        HandshakeError::Io(std::io::Error::other(format!(
            "the operating system's random source failed: {e}"
        )))
    })?;
    Ok(n)
}

/// Reads exactly `buf.len()` bytes, each read bounded by the time left to `deadline`: a peer
/// that sends one byte at a time cannot stretch the wait past it.
pub(crate) fn read_exact_by(
    s: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<(), HandshakeError> {
    let mut done = 0;
    while done < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::TimedOut);
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[done..]) {
            Ok(0) => {
                return Err(HandshakeError::Io(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                )));
            }
            Ok(n) => done += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(HandshakeError::TimedOut);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes all of `buf`, bounded by `deadline`.
pub(crate) fn write_all_by(
    s: &mut TcpStream,
    buf: &[u8],
    deadline: Instant,
) -> Result<(), HandshakeError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(HandshakeError::TimedOut);
    }
    s.set_write_timeout(Some(left))?;
    s.write_all(buf).map_err(|e| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => HandshakeError::TimedOut,
        _ => HandshakeError::Io(e),
    })
}

fn read_array<const N: usize>(
    s: &mut TcpStream,
    deadline: Instant,
) -> Result<[u8; N], HandshakeError> {
    let mut b = [0u8; N];
    read_exact_by(s, &mut b, deadline)?;
    Ok(b)
}

fn read_text(s: &mut TcpStream, max: usize, deadline: Instant) -> Result<String, HandshakeError> {
    let len = u16::from_le_bytes(read_array(s, deadline)?) as usize;
    if len > max {
        return Err(HandshakeError::Protocol(format!(
            "a field of {len} bytes is over the limit of {max}"
        )));
    }
    let mut b = vec![0u8; len];
    read_exact_by(s, &mut b, deadline)?;
    String::from_utf8(b).map_err(|_| HandshakeError::Protocol("a field is not UTF-8".into()))
}

fn put_text(out: &mut Vec<u8>, text: &str, max: usize) {
    let text = &text.as_bytes()[..text.len().min(max)];
    out.extend_from_slice(&(text.len() as u16).to_le_bytes());
    out.extend_from_slice(text);
}

fn read_greeting(s: &mut TcpStream, deadline: Instant) -> Result<(), HandshakeError> {
    let magic: [u8; 4] = read_array(s, deadline)?;
    if &magic != MAGIC {
        return Err(HandshakeError::Protocol("not an llmapi ring peer".into()));
    }
    let version = u32::from_le_bytes(read_array(s, deadline)?);
    if version != VERSION {
        return Err(HandshakeError::Protocol(format!(
            "the peer speaks ring protocol {version}, this build {VERSION}: run the same llmapi version on every rank"
        )));
    }
    Ok(())
}

fn claim_fields(claim: &Claim) -> ([u8; 8], Vec<u8>) {
    (
        (claim.rank as u64).to_le_bytes(),
        claim.address.as_bytes().to_vec(),
    )
}

/// The connecting side: proves `claim` to the listener that is `server` (how both sides name
/// the listener, e.g. "rank 3 at host:port") and checks the listener's proof.
pub(crate) fn connect(
    s: &mut TcpStream,
    key: &GroupKey,
    purpose: Purpose,
    server: &str,
    claim: &Claim,
    deadline: Instant,
) -> Result<Session, HandshakeError> {
    let client_nonce = fresh_nonce()?;
    let mut hello = Vec::with_capacity(9 + NONCE_LEN);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.push(purpose.code());
    hello.extend_from_slice(&client_nonce);
    write_all_by(s, &hello, deadline)?;

    read_greeting(s, deadline)?;
    let server_nonce: [u8; NONCE_LEN] = read_array(s, deadline)?;
    let (rank, address) = claim_fields(claim);
    let proof = key.sign(
        client_label(purpose),
        &[
            &server_nonce,
            &client_nonce,
            &rank,
            &address,
            server.as_bytes(),
        ],
    );
    let mut answer = Vec::new();
    answer.extend_from_slice(&(claim.rank as u32).to_le_bytes());
    put_text(&mut answer, &claim.address, MAX_ADDRESS);
    answer.extend_from_slice(&proof);
    write_all_by(s, &answer, deadline)?;

    let [status] = read_array::<1>(s, deadline)?;
    if status == NOT_AUTHENTICATED {
        return Err(HandshakeError::NotAuthenticated);
    }
    if status != ACCEPTED && status != REFUSED {
        return Err(HandshakeError::Protocol(format!(
            "unknown handshake status {status}"
        )));
    }
    let reason = read_text(s, MAX_REASON, deadline)?;
    let tag: [u8; MAC_LEN] = read_array(s, deadline)?;
    let proven = key.verify(
        server_label(purpose),
        &[
            &client_nonce,
            &server_nonce,
            &rank,
            &address,
            server.as_bytes(),
            &[status],
            reason.as_bytes(),
        ],
        &tag,
    );
    if !proven {
        return Err(HandshakeError::BadProof);
    }
    if status == REFUSED {
        return Err(HandshakeError::Refused(reason));
    }
    Ok(Session {
        key: key.clone(),
        purpose,
        client_nonce,
        server_nonce,
    })
}

/// A connecting side whose proof checked out; the listener has not answered it yet.
#[derive(Debug)]
pub(crate) struct Proven {
    /// What it claims, now known to come from a holder of the secret.
    pub claim: Claim,
    session: Session,
    server: String,
}

/// The listening side, first half: challenges the connecting side and checks its proof. A
/// peer whose proof is wrong is told so (it learns nothing else) and Err is returned.
pub(crate) fn challenge(
    s: &mut TcpStream,
    key: &GroupKey,
    purpose: Purpose,
    server: &str,
    deadline: Instant,
) -> Result<Proven, HandshakeError> {
    read_greeting(s, deadline)?;
    let [code] = read_array::<1>(s, deadline)?;
    if Purpose::from_code(code) != Some(purpose) {
        return Err(HandshakeError::Protocol(format!(
            "the peer asked for connection kind {code}, this listener serves {purpose:?}"
        )));
    }
    let client_nonce: [u8; NONCE_LEN] = read_array(s, deadline)?;
    let server_nonce = fresh_nonce()?;
    let mut hello = Vec::with_capacity(8 + NONCE_LEN);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&server_nonce);
    write_all_by(s, &hello, deadline)?;

    let rank = u32::from_le_bytes(read_array(s, deadline)?) as usize;
    let address = read_text(s, MAX_ADDRESS, deadline)?;
    let tag: [u8; MAC_LEN] = read_array(s, deadline)?;
    let claim = Claim { rank, address };
    let (rank_bytes, address_bytes) = claim_fields(&claim);
    let proven = key.verify(
        client_label(purpose),
        &[
            &server_nonce,
            &client_nonce,
            &rank_bytes,
            &address_bytes,
            server.as_bytes(),
        ],
        &tag,
    );
    if !proven {
        // Best effort: the peer is dropped whether or not it reads this.
        let _ = write_all_by(s, &[NOT_AUTHENTICATED], deadline);
        return Err(HandshakeError::BadProof);
    }
    Ok(Proven {
        claim,
        session: Session {
            key: key.clone(),
            purpose,
            client_nonce,
            server_nonce,
        },
        server: server.to_owned(),
    })
}

impl Proven {
    /// The listening side, second half: accepts the claim (Ok) or refuses it saying why
    /// (Err), and proves itself either way. Returns the session for later messages.
    pub(crate) fn answer(
        self,
        s: &mut TcpStream,
        verdict: Result<(), &str>,
        deadline: Instant,
    ) -> Result<Session, HandshakeError> {
        let (status, reason) = match verdict {
            Ok(()) => (ACCEPTED, ""),
            Err(why) => (REFUSED, why),
        };
        let reason = &reason[..reason.len().min(MAX_REASON)];
        let (rank, address) = claim_fields(&self.claim);
        let session = self.session;
        let tag = session.key.sign(
            server_label(session.purpose),
            &[
                &session.client_nonce,
                &session.server_nonce,
                &rank,
                &address,
                self.server.as_bytes(),
                &[status],
                reason.as_bytes(),
            ],
        );
        let mut msg = vec![status];
        put_text(&mut msg, reason, MAX_REASON);
        msg.extend_from_slice(&tag);
        write_all_by(s, &msg, deadline)?;
        Ok(session)
    }
}

fn client_label(purpose: Purpose) -> &'static str {
    match purpose {
        Purpose::Rendezvous => "rendezvous: rank to leader",
        Purpose::Ring => "ring: rank to successor",
    }
}

fn server_label(purpose: Purpose) -> &'static str {
    match purpose {
        Purpose::Rendezvous => "rendezvous: leader to rank",
        Purpose::Ring => "ring: successor to rank",
    }
}

/// A message the listening side sends after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sealed {
    /// The ring table.
    Table,
    /// The group could not form; the payload says why.
    Failed,
}

impl Sealed {
    fn code(self) -> u8 {
        match self {
            Self::Table => 1,
            Self::Failed => 2,
        }
    }
}

impl Session {
    fn seal_tag(&self, kind: u8, payload: &[u8]) -> HmacSha256 {
        self.key.tag(
            "sealed message: leader to rank",
            &[&self.client_nonce, &self.server_nonce, &[kind], payload],
        )
    }

    /// Sends `payload` with a MAC bound to this session.
    pub(crate) fn send(
        &self,
        s: &mut TcpStream,
        kind: Sealed,
        payload: &[u8],
        deadline: Instant,
    ) -> Result<(), HandshakeError> {
        let tag: [u8; MAC_LEN] = self
            .seal_tag(kind.code(), payload)
            .finalize()
            .into_bytes()
            .into();
        let mut msg = vec![kind.code()];
        msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        msg.extend_from_slice(payload);
        msg.extend_from_slice(&tag);
        write_all_by(s, &msg, deadline)
    }

    /// Receives a message sent with `send`, refusing one whose MAC is wrong.
    pub(crate) fn receive(
        &self,
        s: &mut TcpStream,
        max_len: usize,
        deadline: Instant,
    ) -> Result<(Sealed, Vec<u8>), HandshakeError> {
        let [code] = read_array::<1>(s, deadline)?;
        let kind = match code {
            1 => Sealed::Table,
            2 => Sealed::Failed,
            _ => return Err(HandshakeError::Protocol(format!("unknown message {code}"))),
        };
        let len = u32::from_le_bytes(read_array(s, deadline)?) as usize;
        if len > max_len {
            return Err(HandshakeError::Protocol(format!(
                "a message of {len} bytes is over the limit of {max_len}"
            )));
        }
        let mut payload = vec![0u8; len];
        read_exact_by(s, &mut payload, deadline)?;
        let tag: [u8; MAC_LEN] = read_array(s, deadline)?;
        if self.seal_tag(code, &payload).verify_slice(&tag).is_err() {
            return Err(HandshakeError::BadProof);
        }
        Ok((kind, payload))
    }
}

/// How long the listening side gives one connection to prove itself: long enough for any
/// honest rank on a loaded machine, short enough that a silent stranger is soon dropped.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    /// One handshake between a connecting side with `client_key`, naming the listener
    /// `server_name`, and a listener "leader" with `server_key` that accepts any claim.
    fn run(
        client_key: GroupKey,
        server_key: GroupKey,
        server_name: &str,
    ) -> (
        Result<Session, HandshakeError>,
        Result<Claim, HandshakeError>,
    ) {
        let (mut c, mut s) = pair();
        let deadline = Instant::now() + Duration::from_secs(5);
        let claim = Claim {
            rank: 1,
            address: ":4000".into(),
        };
        let who = server_name.to_owned();
        let client = std::thread::spawn(move || {
            connect(
                &mut c,
                &client_key,
                Purpose::Rendezvous,
                &who,
                &claim,
                deadline,
            )
        });
        let server = challenge(&mut s, &server_key, Purpose::Rendezvous, "leader", deadline)
            .and_then(|p| {
                let claim = p.claim.clone();
                p.answer(&mut s, Ok(()), deadline).map(|_| claim)
            });
        (client.join().unwrap(), server)
    }

    #[test]
    fn both_sides_with_the_secret_authenticate_each_other() {
        let k = GroupKey::new(b"secret", 2, "127.0.0.1:1");
        let (client, server) = run(k.clone(), k, "leader");
        assert!(client.is_ok(), "{client:?}");
        assert_eq!(server.unwrap().address, ":4000");
    }

    #[test]
    fn a_wrong_secret_fails_on_the_listening_side_first() {
        let (client, server) = run(
            GroupKey::new(b"wrong", 2, "127.0.0.1:1"),
            GroupKey::new(b"secret", 2, "127.0.0.1:1"),
            "leader",
        );
        assert!(
            matches!(server, Err(HandshakeError::BadProof)),
            "{server:?}"
        );
        assert!(
            matches!(client, Err(HandshakeError::NotAuthenticated)),
            "{client:?}"
        );
    }

    #[test]
    fn another_group_or_listener_does_not_verify() {
        let right = GroupKey::new(b"secret", 2, "127.0.0.1:1");
        let (_, server) = run(
            GroupKey::new(b"secret", 3, "127.0.0.1:1"),
            right.clone(),
            "leader",
        );
        assert!(matches!(server, Err(HandshakeError::BadProof)));
        let (_, server) = run(
            GroupKey::new(b"secret", 2, "127.0.0.1:2"),
            right.clone(),
            "leader",
        );
        assert!(matches!(server, Err(HandshakeError::BadProof)));
        let (_, server) = run(right.clone(), right, "rank 1 at 127.0.0.1:9");
        assert!(matches!(server, Err(HandshakeError::BadProof)));
    }

    #[test]
    fn a_listener_without_the_secret_is_caught_by_the_connecting_side() {
        let (mut c, mut s) = pair();
        let deadline = Instant::now() + Duration::from_secs(5);
        let client = std::thread::spawn(move || {
            let k = GroupKey::new(b"secret", 2, "127.0.0.1:1");
            let claim = Claim {
                rank: 1,
                address: ":1".into(),
            };
            connect(&mut c, &k, Purpose::Rendezvous, "leader", &claim, deadline)
        });
        // An impostor: greets properly, accepts anything, but cannot compute the MAC.
        let mut hello = [0u8; 4 + 4 + 1 + NONCE_LEN];
        read_exact_by(&mut s, &mut hello, deadline).unwrap();
        let mut reply = MAGIC.to_vec();
        reply.extend_from_slice(&VERSION.to_le_bytes());
        reply.extend_from_slice(&[7u8; NONCE_LEN]);
        s.write_all(&reply).unwrap();
        let mut answer = [0u8; 4 + 2 + 2 + MAC_LEN];
        read_exact_by(&mut s, &mut answer, deadline).unwrap();
        let mut verdict = vec![ACCEPTED, 0, 0];
        verdict.extend_from_slice(&[0u8; MAC_LEN]);
        s.write_all(&verdict).unwrap();
        let r = client.join().unwrap();
        assert!(matches!(r, Err(HandshakeError::BadProof)), "{r:?}");
    }

    #[test]
    fn a_dripping_peer_is_cut_at_the_deadline() {
        let (mut c, mut s) = pair();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(600);
        let drip = std::thread::spawn(move || {
            for b in MAGIC.iter().chain(&[2u8, 0, 0, 0]) {
                if c.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(150));
            }
        });
        let r = challenge(
            &mut s,
            &GroupKey::new(b"k", 2, "x"),
            Purpose::Ring,
            "x",
            deadline,
        );
        assert!(matches!(r, Err(HandshakeError::TimedOut)), "{r:?}");
        assert!(started.elapsed() < Duration::from_millis(900));
        drop(s);
        drip.join().unwrap();
    }
}
