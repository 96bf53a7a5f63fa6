//! Handing rank 0's job secret to the other ranks over an exchange authenticated by MUNGE, the
//! credential service every Slurm cluster runs (`munged`, with a key only root holds).
//!
//! A follower connects to rank 0's bootstrap port. Rank 0 sends a fresh nonce; the follower
//! answers with a MUNGE credential (encoded by its node's munged, which stamps the real UID)
//! whose payload binds the job, its rank, rank 0's nonce and a nonce of its own. Rank 0 decodes
//! it and checks that the UID is its own and the payload is this job's and this connection's
//! (so a captured credential cannot be replayed); then it answers with a credential of its own
//! carrying the secret and the follower's nonce, restricted with `--restrict-uid` so that only
//! this user can have it decoded. The follower decodes it and checks the UID is its own: the
//! secret came from a process of the same user, answering this very request.
//!
//! MUNGE credentials are encrypted with the cluster's MUNGE key (default cipher), but anyone
//! can ask munged to decode a captured one unless it is restricted to a UID; hence the
//! restriction. Root on any node (who holds the key) can read the secret; TLS does not change
//! that. `munge`/`unmunge` run as subprocesses, each bounded in time, payloads on stdin (never
//! on a command line, which `ps` shows).

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::secret::own_uid;

/// How long one `munge` / `unmunge` may run.
const MUNGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one whole exchange may take, however slowly the peer sends.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest line either side accepts (a credential with this payload is about 400 bytes).
const MAX_LINE: u64 = 4096;
/// Exchanges rank 0 runs at once; more connections wait.
const MAX_CONCURRENT: usize = 32;
/// Protocol tag and version of the greeting.
const HELLO: &str = "llmapi-bootstrap 1";

/// What an exchange binds its credentials to.
#[derive(Debug, Clone)]
pub struct Binding {
    /// Job id (and step id) of this job.
    pub job: String,
    /// Ranks in the job.
    pub world_size: usize,
}

/// Whether MUNGE works here: `munge -n` encodes a credential within the time limit.
pub async fn available() -> bool {
    match run("munge", &["-n"], b"").await {
        Ok(out) => out.starts_with(b"MUNGE:"),
        Err(e) => {
            tracing::debug!(error = %e, "MUNGE is not available");
            false
        }
    }
}

/// Runs `program args` with `input` on stdin; its stdout, or Err with its stderr.
async fn run(program: &str, args: &[&str], input: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting `{program}` (is MUNGE installed and on PATH?)"))?;
    let mut stdin = child
        .stdin
        .take()
        .context("the child's stdin was requested as a pipe")?;
    let input = input.to_vec();
    let run = async move {
        stdin.write_all(&input).await?;
        drop(stdin);
        child.wait_with_output().await
    };
    let out = tokio::time::timeout(MUNGE_TIMEOUT, run)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "`{program}` did not finish within {MUNGE_TIMEOUT:?}; is munged running?"
            )
        })?
        .with_context(|| format!("running `{program}`"))?;
    if !out.status.success() {
        bail!(
            "`{program}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Encodes `payload` into a credential only `uid` can have decoded.
async fn encode(payload: &str, uid: u32) -> anyhow::Result<String> {
    let uid = uid.to_string();
    let out = run("munge", &["--restrict-uid", &uid], payload.as_bytes()).await?;
    let cred = String::from_utf8(out).context("munge printed a credential that is not text")?;
    Ok(cred.trim().to_owned())
}

/// A decoded credential: the UID munged vouches for and the payload.
struct Decoded {
    uid: u32,
    payload: String,
}

async fn decode(cred: &str) -> anyhow::Result<Decoded> {
    let out = run("unmunge", &["--numeric", "--keys=UID"], cred.as_bytes()).await?;
    let text = String::from_utf8(out).context("unmunge printed a payload that is not text")?;
    let (meta, payload) = text
        .split_once("\n\n")
        .context("unmunge printed no payload")?;
    let uid = meta
        .lines()
        .find_map(|l| l.strip_prefix("UID:"))
        .and_then(|v| v.trim().parse().ok())
        .context("unmunge printed no numeric UID")?;
    Ok(Decoded {
        uid,
        payload: payload.to_owned(),
    })
}

/// `kind k=v k=v ...` as a map; `kind` under the key "".
fn fields(payload: &str) -> HashMap<&str, &str> {
    let mut words = payload.split_whitespace();
    let mut map = HashMap::new();
    if let Some(kind) = words.next() {
        map.insert("", kind);
    }
    for w in words {
        if let Some((k, v)) = w.split_once('=') {
            map.insert(k, v);
        }
    }
    map
}

fn nonce() -> anyhow::Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("drawing a nonce from the OS: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

async fn read_line<R: tokio::io::AsyncRead + Unpin>(
    r: &mut BufReader<R>,
) -> anyhow::Result<String> {
    let mut line = String::new();
    let n = r.take(MAX_LINE).read_line(&mut line).await?;
    if n == 0 {
        bail!("the peer closed the connection");
    }
    if !line.ends_with('\n') {
        bail!("the peer sent a line longer than {MAX_LINE} bytes");
    }
    Ok(line.trim_end().to_owned())
}

/// Rank 0: serves the secret on `bind:port` to followers that prove, with MUNGE, that they
/// run as this user in this job. Runs until the returned task is aborted.
pub async fn serve(
    bind: &str,
    port: u16,
    secret: String,
    binding: Binding,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind((bind, port)).await.with_context(|| {
        format!(
            "binding the job-secret exchange on {bind}:{port}; pick a free --bootstrap_port \
             (every task of the job needs the same one)"
        )
    })?;
    let secret: Arc<str> = Arc::from(secret);
    let binding = Arc::new(binding);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    Ok(tokio::spawn(async move {
        loop {
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a job-secret exchange failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (secret, binding) = (Arc::clone(&secret), Arc::clone(&binding));
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(EXCHANGE_TIMEOUT, hand_out(stream, &secret, &binding))
                    .await
                {
                    Ok(Ok(rank)) => tracing::info!(rank, %peer, "handed the job secret to a rank"),
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, error = %e, "refused a job-secret request")
                    }
                    Err(_) => tracing::warn!(%peer, "a job-secret request timed out"),
                }
            });
        }
    }))
}

/// One exchange on rank 0's side; returns the follower's rank.
async fn hand_out(stream: TcpStream, secret: &str, binding: &Binding) -> anyhow::Result<usize> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let ours = nonce()?;
    w.write_all(format!("{HELLO} {ours}\n").as_bytes()).await?;
    let cred = read_line(&mut r).await?;
    let checked = async {
        let d = decode(&cred).await?;
        let me = own_uid();
        if d.uid != me {
            bail!(
                "the credential is from uid {}, not from this job's user (uid {me})",
                d.uid
            );
        }
        let f = fields(&d.payload);
        if f.get("") != Some(&"join") || f.get("job") != Some(&binding.job.as_str()) {
            bail!(
                "the credential is not a request to join job {}",
                binding.job
            );
        }
        if f.get("leader_nonce") != Some(&ours.as_str()) {
            bail!("the credential was made for another exchange (replayed)");
        }
        let rank: usize = f
            .get("rank")
            .and_then(|r| r.parse().ok())
            .filter(|r| (1..binding.world_size).contains(r))
            .context("the credential names no follower rank of this job")?;
        let theirs = f
            .get("follower_nonce")
            .filter(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .context("the credential has no follower nonce")?;
        anyhow::Ok((rank, theirs.to_string(), me))
    }
    .await;
    let (rank, theirs, me) = match checked {
        Ok(v) => v,
        Err(e) => {
            let _ = w.write_all(format!("error {e}\n").as_bytes()).await;
            return Err(e);
        }
    };
    let payload = format!(
        "secret job={} rank={rank} follower_nonce={theirs} secret={secret}",
        binding.job
    );
    let answer = encode(&payload, me).await?;
    w.write_all(format!("{answer}\n").as_bytes()).await?;
    w.shutdown().await?;
    Ok(rank)
}

/// A follower: fetches the secret from rank 0 at `host:port`, retrying until `deadline` while
/// rank 0 is not up yet.
pub async fn fetch(
    host: &str,
    port: u16,
    rank: usize,
    binding: &Binding,
    deadline: Duration,
) -> anyhow::Result<String> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let last =
            match tokio::time::timeout(EXCHANGE_TIMEOUT, ask(host, port, rank, binding)).await {
                Ok(Ok(secret)) => return Ok(secret),
                Ok(Err(e)) => e,
                Err(_) => anyhow::anyhow!("the exchange took longer than {EXCHANGE_TIMEOUT:?}"),
            };
        if tokio::time::Instant::now() >= until {
            return Err(last.context(format!(
                "rank {rank} could not get the job secret from rank 0 at {host}:{port} within {deadline:?} \
                 (MUNGE exchange); check that every task has the same --bootstrap_port and that the port is \
                 reachable, or set LLMAPI_JOB_TOKEN_FILE on every task"
            )));
        }
        tracing::debug!(error = %last, "the job secret is not available yet; retrying");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// One exchange on a follower's side.
async fn ask(host: &str, port: u16, rank: usize, binding: &Binding) -> anyhow::Result<String> {
    let stream = TcpStream::connect((host, port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let hello = read_line(&mut r).await?;
    let leader_nonce = hello
        .strip_prefix(HELLO)
        .map(str::trim)
        .filter(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .with_context(|| format!("{host}:{port} does not speak the job-secret exchange"))?
        .to_owned();
    let ours = nonce()?;
    let me = own_uid();
    let request = format!(
        "join job={} rank={rank} leader_nonce={leader_nonce} follower_nonce={ours}",
        binding.job
    );
    let cred = encode(&request, me).await?;
    w.write_all(format!("{cred}\n").as_bytes()).await?;
    let answer = read_line(&mut r).await?;
    if let Some(why) = answer.strip_prefix("error ") {
        bail!("rank 0 refused: {why}");
    }
    let d = decode(&answer).await?;
    if d.uid != me {
        bail!(
            "the answer from {host}:{port} is from uid {}, not from this user (uid {me}): not this job's rank 0",
            d.uid
        );
    }
    let f = fields(&d.payload);
    let rank_text = rank.to_string();
    if f.get("") != Some(&"secret")
        || f.get("job") != Some(&binding.job.as_str())
        || f.get("rank") != Some(&rank_text.as_str())
        || f.get("follower_nonce") != Some(&ours.as_str())
    {
        bail!("the answer from {host}:{port} was not made for this request");
    }
    let secret = f.get("secret").context("the answer carries no secret")?;
    llmapi_proto::auth::check_token(secret).context("the secret rank 0 sent")?;
    Ok((*secret).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn munge_here() -> bool {
        std::process::Command::new("munge")
            .arg("-n")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn free_port() -> u16 {
        llmapi_common::net::free_port(std::net::Ipv4Addr::LOCALHOST.into()).unwrap()
    }

    #[test]
    fn payload_fields_parse() {
        let f = fields("join job=12.0 rank=3 leader_nonce=ab");
        assert_eq!(f[""], "join");
        assert_eq!(f["job"], "12.0");
        assert_eq!(f["rank"], "3");
    }

    /// With munged running (as under the CI's Slurm): a follower of the job gets rank 0's
    /// secret; one claiming another job, or a rank outside the job, is refused.
    #[tokio::test]
    async fn a_follower_of_the_job_gets_the_secret_and_others_are_refused() {
        if !munge_here() {
            eprintln!("notice: munged is not running here; skipping");
            return;
        }
        let port = free_port();
        let binding = Binding {
            job: "77.0".into(),
            world_size: 3,
        };
        let task = serve("127.0.0.1", port, "s".repeat(64), binding.clone())
            .await
            .unwrap();
        let got = fetch("127.0.0.1", port, 2, &binding, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(got, "s".repeat(64));
        let other_job = Binding {
            job: "78.0".into(),
            world_size: 3,
        };
        let err = ask("127.0.0.1", port, 1, &other_job).await.unwrap_err();
        assert!(
            err.to_string().contains("not a request to join job 77.0"),
            "{err:#}"
        );
        let err = ask("127.0.0.1", port, 3, &binding).await.unwrap_err();
        assert!(err.to_string().contains("no follower rank"), "{err:#}");
        task.abort();
    }

    /// A stranger who connects and replays a credential captured from an earlier exchange
    /// gets nothing: the nonce of this connection differs.
    #[tokio::test]
    async fn a_replayed_credential_is_refused() {
        if !munge_here() {
            eprintln!("notice: munged is not running here; skipping");
            return;
        }
        let port = free_port();
        let binding = Binding {
            job: "79.0".into(),
            world_size: 2,
        };
        let task = serve("127.0.0.1", port, "t".repeat(64), binding.clone())
            .await
            .unwrap();
        // An earlier, genuine request credential (made for some other connection's nonce).
        let cred = encode(
            &format!(
                "join job=79.0 rank=1 leader_nonce={} follower_nonce={}",
                "0".repeat(32),
                "1".repeat(32)
            ),
            own_uid(),
        )
        .await
        .unwrap();
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        assert!(read_line(&mut r).await.unwrap().starts_with(HELLO));
        w.write_all(format!("{cred}\n").as_bytes()).await.unwrap();
        let answer = read_line(&mut r).await.unwrap();
        assert!(answer.starts_with("error "), "{answer}");
        assert!(!answer.contains(&"t".repeat(64)));
        task.abort();
    }

    /// Another user of the cluster, with a genuine MUNGE credential of their own that binds
    /// this very exchange, is refused: the UID is not the job's. (Needs root, to act as
    /// `nobody`; CI runs as root.)
    #[tokio::test]
    async fn a_credential_of_another_user_is_refused() {
        if !munge_here() || own_uid() != 0 {
            eprintln!("notice: needs munged and root; skipping");
            return;
        }
        let port = free_port();
        let binding = Binding {
            job: "80.0".into(),
            world_size: 2,
        };
        let task = serve("127.0.0.1", port, "u".repeat(64), binding.clone())
            .await
            .unwrap();
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let hello = read_line(&mut r).await.unwrap();
        let leader_nonce = hello.strip_prefix(HELLO).unwrap().trim().to_owned();
        let payload = format!(
            "join job=80.0 rank=1 leader_nonce={leader_nonce} follower_nonce={}",
            "2".repeat(32)
        );
        let cred = run(
            "runuser",
            &["-u", "nobody", "--", "munge", "--restrict-uid", "0"],
            payload.as_bytes(),
        )
        .await
        .unwrap();
        w.write_all(&cred).await.unwrap();
        w.write_all(b"\n").await.unwrap();
        let answer = read_line(&mut r).await.unwrap();
        assert!(answer.contains("not from this job's user"), "{answer}");
        assert!(!answer.contains(&"u".repeat(64)));
        task.abort();
    }
}
