//! The job secret: the one value that proves a process belongs to this job.
//!
//! It is the router's admin token for registration (POST/DELETE /workers), the bearer token
//! of every call to a worker (gRPC) and the tensor-parallel ring's token. It is never derived
//! from public facts: the job id, node list and task count are what `squeue` shows every user
//! of the cluster. A job task takes it, in this order, from:
//!
//! 1. `LLMAPI_JOB_TOKEN`, or `LLMAPI_JOB_TOKEN_FILE` (a file only its owner may read);
//! 2. under Slurm, where MUNGE answers: rank 0 draws a fresh random secret and hands it to the
//!    other ranks over an exchange authenticated with MUNGE credentials ([`crate::munge`]);
//! 3. else a fresh random secret that rank 0 writes, mode 0600, to
//!    `~/.llmapi/jobs/<job>.secret` on the (shared) home directory, and the other ranks read;
//! 4. else the job refuses to start, naming these three ways.
//!
//! `LLMAPI_JOB_SECRET_VIA=munge|file` forces way 2 or 3. A local `serve --tp_size N` draws a
//! random secret and hands it to the ranks it spawns through their environment
//! (`group::LocalRanks`), never over the network.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use llmapi_common::secret_file::read_secret_file;
use llmapi_proto::auth::check_token;

use crate::munge;
use crate::placement::{Launcher, Placement};

/// The job secret given by the user.
pub const ENV_TOKEN: &str = "LLMAPI_JOB_TOKEN";
/// A file holding the job secret (mode 0600 or stricter).
pub const ENV_TOKEN_FILE: &str = "LLMAPI_JOB_TOKEN_FILE";
/// Forces how a job without a given secret shares one: `munge` or `file`.
pub const ENV_VIA: &str = "LLMAPI_JOB_SECRET_VIA";
/// How long a rank waits for rank 0 to publish the secret (rank 0 does it before loading).
pub const FETCH_DEADLINE: Duration = Duration::from_secs(120);
/// Random bytes in a drawn secret.
const SECRET_BYTES: usize = 32;
/// A secret shorter than this is accepted with a warning.
const SHORT_SECRET: usize = 16;

/// What refusing a job without a secret says.
const THE_THREE_WAYS: &str = "give every task the same secret with LLMAPI_JOB_TOKEN_FILE=<file \
readable only by you> (or LLMAPI_JOB_TOKEN, e.g. from `openssl rand -hex 32` in the batch script), \
or run under Slurm with MUNGE (munged running, `munge`/`unmunge` on PATH), or give the job a home \
directory that every node shares (HOME) so that rank 0 can write the secret to ~/.llmapi/jobs/";

/// Where a job's secret came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// LLMAPI_JOB_TOKEN or LLMAPI_JOB_TOKEN_FILE.
    Given,
    /// Drawn here (rank 0, or a local group's leader).
    Drawn,
    /// Received from rank 0 over the MUNGE-authenticated exchange.
    Munge,
    /// Read from the file rank 0 wrote.
    SharedFile(PathBuf),
}

/// What rank 0 keeps alive while the job runs.
enum Keep {
    Nothing,
    /// The MUNGE exchange serving followers; stopped when the secret is dropped.
    Exchange(tokio::task::JoinHandle<()>),
    /// The shared secret file; removed when the secret is dropped.
    File(PathBuf),
}

/// The job secret, with whatever publishes it to the other ranks.
pub struct JobSecret {
    token: String,
    origin: Origin,
    keep: Keep,
}

impl std::fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobSecret")
            .field("token", &"<redacted>")
            .field("origin", &self.origin)
            .finish()
    }
}

impl Drop for JobSecret {
    fn drop(&mut self) {
        match &self.keep {
            Keep::Nothing => {}
            Keep::Exchange(task) => task.abort(),
            Keep::File(path) => {
                if let Err(e) = std::fs::remove_file(path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove the job's secret file");
                }
            }
        }
    }
}

impl JobSecret {
    /// The secret, as sent in bearer tokens.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Where it came from.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    fn plain(token: String, origin: Origin) -> Self {
        Self {
            token,
            origin,
            keep: Keep::Nothing,
        }
    }
}

/// A fresh random secret: 32 bytes from the operating system, hex encoded.
pub fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("drawing a random job secret from the OS: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The secret the user gave: `LLMAPI_JOB_TOKEN` or the file `LLMAPI_JOB_TOKEN_FILE` names
/// (refused when group or others may read it). Err when both are set.
pub fn given() -> anyhow::Result<Option<String>> {
    let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    let token = match (var(ENV_TOKEN), var(ENV_TOKEN_FILE)) {
        (Some(_), Some(_)) => {
            bail!("both {ENV_TOKEN} and {ENV_TOKEN_FILE} are set; set only one of them")
        }
        (Some(t), None) => t,
        (None, Some(path)) => read_secret_file(Path::new(&path))
            .with_context(|| format!("{ENV_TOKEN_FILE}={path}"))?,
        (None, None) => return Ok(None),
    };
    check_token(&token).with_context(|| format!("the secret in {ENV_TOKEN} / {ENV_TOKEN_FILE}"))?;
    if token.len() < SHORT_SECRET {
        tracing::warn!(
            length = token.len(),
            "the job secret is shorter than {SHORT_SECRET} characters; use e.g. `openssl rand -hex 32`"
        );
    }
    Ok(Some(token))
}

/// The secret of a local `serve` (its worker and the ranks it spawns): the given one, else a
/// fresh random one.
pub fn for_local() -> anyhow::Result<String> {
    match given()? {
        Some(t) => Ok(t),
        None => random_token(),
    }
}

/// How a job without a given secret shares one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Munge,
    File,
}

/// The job's identity as the exchange binds it: job id, and step id where Slurm gives one (a
/// batch job may run several steps, each with its own secret).
fn job_key(p: &Placement) -> Option<String> {
    let job = p.job_id.as_deref().filter(|j| !j.is_empty())?;
    Some(match std::env::var("SLURM_STEP_ID") {
        Ok(step) if !step.is_empty() => format!("{job}.{step}"),
        _ => job.to_owned(),
    })
}

/// The host followers reach rank 0 at: the node rank 0 runs on.
fn leader_host(p: &Placement) -> Option<String> {
    if p.nodes.len() == 1 {
        return Some("127.0.0.1".to_owned());
    }
    p.node_of_rank(0).and_then(|i| p.nodes.get(i).cloned())
}

/// `~/.llmapi/jobs`.
fn secrets_dir() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(PathBuf::from(home).join(".llmapi").join("jobs"))
}

async fn choose(p: &Placement) -> anyhow::Result<Via> {
    let forced = std::env::var(ENV_VIA).ok().filter(|v| !v.is_empty());
    match forced.as_deref() {
        Some("munge") => return Ok(Via::Munge),
        Some("file") => return Ok(Via::File),
        Some(other) => bail!(
            "{ENV_VIA}={other} is not a way to share the job secret; use munge or file (or unset it)"
        ),
        None => {}
    }
    let munge_fits = p.launcher == Launcher::Slurm && leader_host(p).is_some();
    if munge_fits && munge::available().await {
        return Ok(Via::Munge);
    }
    if secrets_dir().is_some() {
        return Ok(Via::File);
    }
    bail!("this job has no secret to authenticate its tasks with; {THE_THREE_WAYS}")
}

/// The job secret of this task of `p`. Rank 0 of a job without a given secret draws it and,
/// while the returned value lives, publishes it to the other ranks (the MUNGE exchange on
/// `bootstrap_port`, or the shared file); the other ranks fetch it, waiting up to
/// `FETCH_DEADLINE`. With `external_router`, the secret must be given (the router must know it).
pub async fn for_job(
    p: &Placement,
    bootstrap_port: u16,
    external_router: bool,
) -> anyhow::Result<JobSecret> {
    if let Some(token) = given()? {
        return Ok(JobSecret::plain(token, Origin::Given));
    }
    if external_router {
        bail!(
            "--router_url: the external router must know the job secret; set {ENV_TOKEN_FILE} (or {ENV_TOKEN}) \
             on every task and give llmapi-router the same secret as --admin_token and --worker_token_file"
        );
    }
    let Some(key) = job_key(p) else {
        bail!("this job has no job id to bind its secret to; {THE_THREE_WAYS}");
    };
    match choose(p).await? {
        Via::Munge => {
            let Some(host) = leader_host(p) else {
                bail!(
                    "{ENV_VIA}=munge, but the node rank 0 runs on is unknown (no node list); {THE_THREE_WAYS}"
                );
            };
            let binding = munge::Binding {
                job: key,
                world_size: p.world_size,
            };
            if p.rank == 0 {
                let token = random_token()?;
                let bind = if p.nodes.len() == 1 {
                    "127.0.0.1"
                } else {
                    "0.0.0.0"
                };
                let task = munge::serve(bind, bootstrap_port, token.clone(), binding).await?;
                tracing::info!(port = bootstrap_port, "sharing the job secret over MUNGE");
                Ok(JobSecret {
                    token,
                    origin: Origin::Drawn,
                    keep: Keep::Exchange(task),
                })
            } else {
                let token =
                    munge::fetch(&host, bootstrap_port, p.rank, &binding, FETCH_DEADLINE).await?;
                tracing::info!("received the job secret over MUNGE");
                Ok(JobSecret::plain(token, Origin::Munge))
            }
        }
        Via::File => {
            let Some(dir) = secrets_dir() else {
                bail!("{ENV_VIA}=file, but HOME is unset; {THE_THREE_WAYS}");
            };
            let path = dir.join(format!("{key}.secret"));
            if p.rank == 0 {
                let token = random_token()?;
                publish(&dir, &path, &token)?;
                tracing::info!(path = %path.display(), "shared the job secret through a file only this user can read");
                Ok(JobSecret {
                    token,
                    origin: Origin::Drawn,
                    keep: Keep::File(path),
                })
            } else {
                let token = read_published(&path, FETCH_DEADLINE).await?;
                Ok(JobSecret::plain(token, Origin::SharedFile(path)))
            }
        }
    }
}

/// This process's effective user id.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates `dir` (mode 0700) if needed and checks that only this user can change it.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if meta.uid() != own_uid() {
        bail!(
            "{} belongs to uid {}, not to this user ({}); remove it or set {ENV_TOKEN_FILE}",
            dir.display(),
            meta.uid(),
            own_uid()
        );
    }
    if meta.permissions().mode() & 0o022 != 0 {
        bail!(
            "{} can be written by group or others; run `chmod 700 {}`",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Rank 0: writes `token` to `path` (mode 0600) so that it appears whole or not at all, and
/// never over a file another process created meanwhile.
fn publish(dir: &Path, path: &Path, token: &str) -> anyhow::Result<()> {
    private_dir(dir)?;
    // A file left by a crashed earlier run of the same job id is never this run's.
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed a stale job secret file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(token.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        // link() fails if the name exists: the published file is this one, whole.
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    written.with_context(|| format!("writing the job secret to {}", path.display()))
}

/// The other ranks: waits up to `deadline` for rank 0's file, then checks that it is this
/// user's, private and fresh before taking its secret.
async fn read_published(path: &Path, deadline: Duration) -> anyhow::Result<String> {
    let started = SystemTime::now();
    // Rank 0 writes the file as it starts; one older than this was left by an earlier run.
    let oldest = started - Duration::from_secs(60);
    let until = tokio::time::Instant::now() + deadline;
    let mut last = String::from("it does not exist yet");
    loop {
        match std::fs::metadata(path) {
            Ok(meta) => match check_published(&meta, oldest) {
                Ok(()) => {
                    let token = read_secret_file(path)?;
                    check_token(&token)
                        .with_context(|| format!("the secret in {}", path.display()))?;
                    tracing::info!(path = %path.display(), "read the job secret rank 0 wrote");
                    return Ok(token);
                }
                Err(why) => last = why,
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => last = e.to_string(),
        }
        if tokio::time::Instant::now() >= until {
            bail!(
                "rank 0 did not publish the job secret at {} within {deadline:?} ({last}); is the home \
                 directory shared by every node? Otherwise {THE_THREE_WAYS}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn check_published(meta: &std::fs::Metadata, oldest: SystemTime) -> Result<(), String> {
    if meta.uid() != own_uid() {
        return Err(format!(
            "it belongs to uid {}, not to this user",
            meta.uid()
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err("group or others can read it".to_owned());
    }
    match meta.modified() {
        Ok(t) if t >= oldest => Ok(()),
        _ => Err("it is older than this job (left by an earlier run)".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drawn_secrets_are_32_random_bytes_and_differ() {
        let a = random_token().unwrap();
        let b = random_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn a_published_secret_is_private_and_read_by_the_other_ranks() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join(".llmapi/jobs");
        let path = dir.join("42.0.secret");
        publish(&dir, &path, "abc123abc123abc123").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let got = read_published(&path, Duration::from_secs(1)).await.unwrap();
        assert_eq!(got, "abc123abc123abc123");
        // A second publish replaces the file (a stale one from an earlier run).
        publish(&dir, &path, "def456def456def456").unwrap();
        let got = read_published(&path, Duration::from_secs(1)).await.unwrap();
        assert_eq!(got, "def456def456def456");
    }

    #[tokio::test]
    async fn a_secret_file_others_can_read_is_not_taken() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join("7.secret");
        std::fs::write(&path, "planted-planted-planted").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_published(&path, Duration::from_millis(300))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("group or others can read it"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_secret_file_fails_after_the_deadline_naming_the_three_ways() {
        let home = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let err = read_published(&home.path().join("9.secret"), Duration::from_millis(300))
            .await
            .unwrap_err()
            .to_string();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            err.contains("LLMAPI_JOB_TOKEN_FILE") && err.contains("MUNGE"),
            "{err}"
        );
    }
}
