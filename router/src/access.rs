//! The HTTP front's access flags, shared by `llmapi-router` and `llmapi-launch serve` (one
//! definition, flattened into both command lines): the API, metrics and admin secrets, each
//! from a flag, an environment variable or a file; the metrics listener; and what worker
//! registration accepts.
//!
//! Secrets never enter `LlmArgs` (which `--print_config` prints and YAML sets). A secret given
//! as a flag is visible to every user of the machine in `ps`; `apply` returns a warning
//! naming the environment variable and the file flag to use instead.

use std::path::{Path, PathBuf};

use clap::ArgMatches;
use clap::parser::ValueSource;

use crate::auth::Secret;
use crate::registration::{DEFAULT_MAX_WORKERS, DEFAULT_WORKER_LEASE_S};
use crate::state::RouterConfig;

/// Access flags of the router's HTTP front.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AccessArgs {
    /// Bearer key that every route but /health requires (/v1/*, /health_generate, /version,
    /// /workers, /metrics). Prefer LLMAPI_API_KEY or --api_key_file: a flag shows in `ps`.
    #[arg(
        long = "api_key",
        env = "LLMAPI_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,
    /// File holding the API key (one line; surrounding whitespace is ignored).
    #[arg(
        long = "api_key_file",
        env = "LLMAPI_API_KEY_FILE",
        value_name = "PATH"
    )]
    pub api_key_file: Option<PathBuf>,
    /// Bearer key that /metrics accepts besides the API key, for a scraper that should not
    /// hold the API key. Prefer LLMAPI_METRICS_API_KEY or --metrics_api_key_file.
    #[arg(
        long = "metrics_api_key",
        env = "LLMAPI_METRICS_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub metrics_api_key: Option<String>,
    /// File holding the metrics key.
    #[arg(
        long = "metrics_api_key_file",
        env = "LLMAPI_METRICS_API_KEY_FILE",
        value_name = "PATH"
    )]
    pub metrics_api_key_file: Option<PathBuf>,
    /// Serve /metrics on this port of --host instead of the API port.
    #[arg(long = "metrics_port", value_name = "PORT")]
    pub metrics_port: Option<u16>,
    /// Bearer token that POST/DELETE /workers require; without one, registration is off.
    /// Prefer LLMAPI_ADMIN_TOKEN or --admin_token_file.
    #[arg(
        long = "admin_token",
        env = "LLMAPI_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub admin_token: Option<String>,
    /// File holding the admin token.
    #[arg(
        long = "admin_token_file",
        env = "LLMAPI_ADMIN_TOKEN_FILE",
        value_name = "PATH"
    )]
    pub admin_token_file: Option<PathBuf>,
    /// Hosts (names or addresses) whose workers POST /workers accepts, comma separated.
    /// Unset: loopback addresses only. The job's nodes (under llmapi-launch) and the hosts of
    /// workers already in the pool are always accepted.
    #[arg(
        long = "worker_url_allowlist",
        value_delimiter = ',',
        value_name = "HOST,..."
    )]
    pub worker_url_allowlist: Option<Vec<String>>,
    /// Most workers the pool holds; a registration past it gets 409.
    #[arg(long = "max_workers", default_value_t = DEFAULT_MAX_WORKERS, value_name = "N")]
    pub max_workers: usize,
    /// Seconds a registered worker stays in the pool without renewing its registration
    /// (workers started by llmapi-launch renew every third of it); 0: forever (until DELETE).
    #[arg(long = "worker_lease_s", default_value_t = DEFAULT_WORKER_LEASE_S, value_name = "SECONDS")]
    pub worker_lease_s: u64,
}

/// Why the access flags cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// Both a value and a file were given for one secret.
    #[error(
        "both --{flag} (or {env}) and --{flag}_file (or {env}_FILE) are set; give the {what} one way"
    )]
    Both {
        /// The flag name without dashes.
        flag: &'static str,
        /// Its environment variable.
        env: &'static str,
        /// The secret's name.
        what: &'static str,
    },
    /// A secret's file could not be read.
    #[error("cannot read the {what} from --{flag}_file {}: {source}; fix the path or its permissions", path.display())]
    Read {
        /// The secret's name.
        what: &'static str,
        /// The flag name without dashes.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A secret's file holds nothing but whitespace.
    #[error("--{flag}_file {} is empty; write the {what} into it, or drop the flag", path.display())]
    EmptyFile {
        /// The secret's name.
        what: &'static str,
        /// The flag name without dashes.
        flag: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A secret given on the command line is empty.
    #[error("--{flag} is empty; give the {what}, or drop the flag to run without one")]
    EmptyValue {
        /// The secret's name.
        what: &'static str,
        /// The flag name without dashes.
        flag: &'static str,
    },
    /// An allowlist entry is empty (e.g. a trailing comma).
    #[error(
        "--worker_url_allowlist has an empty entry; list host names or addresses separated by commas"
    )]
    EmptyAllowlistEntry,
    /// The metrics port is the API port.
    #[error(
        "--metrics_port {0} is the API port; pick another port, or drop it to serve /metrics on the API port"
    )]
    MetricsPortClash(u16),
}

/// One secret's three sources.
struct SecretFlag<'a> {
    what: &'static str,
    flag: &'static str,
    env: &'static str,
    value: &'a Option<String>,
    file: &'a Option<PathBuf>,
}

impl SecretFlag<'_> {
    /// The secret, if any source gives one; pushes a warning when it came from the command
    /// line or from a file other users may read.
    fn resolve(
        &self,
        matches: &ArgMatches,
        warnings: &mut Vec<String>,
    ) -> Result<Option<Secret>, AccessError> {
        match (self.value, self.file) {
            (Some(_), Some(_)) => Err(AccessError::Both {
                flag: self.flag,
                env: self.env,
                what: self.what,
            }),
            (Some(v), None) => {
                let on_command_line =
                    matches.value_source(self.flag) == Some(ValueSource::CommandLine);
                if on_command_line {
                    warnings.push(format!(
                        "the {} is given on the command line (--{}), where every user of this machine can read it (ps, /proc); pass it in {} or --{}_file instead",
                        self.what, self.flag, self.env, self.flag
                    ));
                }
                match Secret::new(self.what, v.trim()) {
                    Ok(s) => Ok(Some(s)),
                    // An empty variable means "unset", as shells make it easy to leave one empty.
                    Err(_) if !on_command_line => Ok(None),
                    Err(_) => Err(AccessError::EmptyValue {
                        what: self.what,
                        flag: self.flag,
                    }),
                }
            }
            (None, Some(path)) => {
                let read = |source| AccessError::Read {
                    what: self.what,
                    flag: self.flag,
                    path: path.clone(),
                    source,
                };
                let text = std::fs::read_to_string(path).map_err(read)?;
                if let Some(w) = loose_permissions(path, self.what) {
                    warnings.push(w);
                }
                Secret::new(self.what, text.trim())
                    .map(Some)
                    .map_err(|_| AccessError::EmptyFile {
                        what: self.what,
                        flag: self.flag,
                        path: path.clone(),
                    })
            }
            (None, None) => Ok(None),
        }
    }
}

/// A warning when `path` may be read by users other than its owner.
#[cfg(unix)]
fn loose_permissions(path: &Path, what: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| {
        format!(
            "the {what} file {} may be read by other users (mode {:o}); run chmod 600 on it",
            path.display(),
            mode & 0o777
        )
    })
}

#[cfg(not(unix))]
fn loose_permissions(_: &Path, _: &str) -> Option<String> {
    None
}

impl AccessArgs {
    /// Reads every secret (from its flag, variable or file) into `config`, with the metrics
    /// port and the registration limits. `matches` are the command line these args were parsed
    /// from (to tell a flag from an environment variable); `api_port` is the API's port.
    /// Returns warnings to log.
    pub fn apply(
        &self,
        matches: &ArgMatches,
        api_port: u16,
        config: &mut RouterConfig,
    ) -> Result<Vec<String>, AccessError> {
        let mut warnings = Vec::new();
        config.api_key = SecretFlag {
            what: "API key",
            flag: "api_key",
            env: "LLMAPI_API_KEY",
            value: &self.api_key,
            file: &self.api_key_file,
        }
        .resolve(matches, &mut warnings)?;
        config.metrics_api_key = SecretFlag {
            what: "metrics key",
            flag: "metrics_api_key",
            env: "LLMAPI_METRICS_API_KEY",
            value: &self.metrics_api_key,
            file: &self.metrics_api_key_file,
        }
        .resolve(matches, &mut warnings)?;
        config.admin_token = SecretFlag {
            what: "admin token",
            flag: "admin_token",
            env: "LLMAPI_ADMIN_TOKEN",
            value: &self.admin_token,
            file: &self.admin_token_file,
        }
        .resolve(matches, &mut warnings)?;
        if self.metrics_port == Some(api_port) {
            return Err(AccessError::MetricsPortClash(api_port));
        }
        config.metrics_port = self.metrics_port;
        if let Some(hosts) = &self.worker_url_allowlist {
            let hosts: Vec<String> = hosts.iter().map(|h| h.trim().to_owned()).collect();
            if hosts.iter().any(String::is_empty) {
                return Err(AccessError::EmptyAllowlistEntry);
            }
            config.registration.allowlist = Some(hosts);
        }
        config.registration.max_workers = self.max_workers;
        config.registration.lease =
            (self.worker_lease_s > 0).then(|| std::time::Duration::from_secs(self.worker_lease_s));
        Ok(warnings)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use clap::{Args, Command, FromArgMatches};

    use super::*;

    fn parse(argv: &[&str]) -> (AccessArgs, ArgMatches) {
        let cmd = AccessArgs::augment_args(Command::new("t"));
        let m = cmd.try_get_matches_from(argv).expect("valid flags");
        (AccessArgs::from_arg_matches(&m).expect("parsed"), m)
    }

    fn apply(argv: &[&str]) -> Result<(RouterConfig, Vec<String>), AccessError> {
        let (args, m) = parse(argv);
        let mut config = RouterConfig::default();
        let warnings = args.apply(&m, 8000, &mut config)?;
        Ok((config, warnings))
    }

    fn key_file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(contents.as_bytes()).expect("write");
        f
    }

    #[test]
    fn a_key_on_the_command_line_works_and_warns_naming_the_safe_ways() {
        let (config, warnings) = apply(&["t", "--api_key", "sk-cli"]).expect("valid");
        assert!(config.api_key.expect("set").matches(b"sk-cli"));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("LLMAPI_API_KEY"), "{}", warnings[0]);
        assert!(warnings[0].contains("--api_key_file"), "{}", warnings[0]);
    }

    #[test]
    fn a_key_file_is_read_trimmed_without_a_command_line_warning() {
        let f = key_file("sk-from-file\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
        }
        let path = f.path().to_str().expect("utf-8 path");
        let (config, warnings) = apply(&["t", "--api_key_file", path]).expect("valid");
        let key = config.api_key.expect("set");
        assert!(key.matches(b"sk-from-file"));
        assert!(!key.matches(b"sk-from-file\n"));
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_other_users_may_read_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let f = key_file("sk");
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let path = f.path().to_str().expect("utf-8 path");
        let (_, warnings) = apply(&["t", "--admin_token_file", path]).expect("valid");
        assert!(
            warnings.iter().any(|w| w.contains("chmod 600")),
            "{warnings:?}"
        );
    }

    #[test]
    fn empty_or_unreadable_key_files_and_empty_flags_are_refused() {
        let empty = key_file(" \n");
        let path = empty.path().to_str().expect("utf-8 path");
        let e = apply(&["t", "--api_key_file", path])
            .unwrap_err()
            .to_string();
        assert!(e.contains("is empty") && e.contains(path), "{e}");
        let e = apply(&["t", "--metrics_api_key_file", "/nonexistent/key"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read the metrics key") && e.contains("/nonexistent/key"),
            "{e}"
        );
        let e = apply(&["t", "--admin_token", ""]).unwrap_err().to_string();
        assert!(e.contains("--admin_token is empty"), "{e}");
    }

    #[test]
    fn a_key_given_two_ways_is_refused() {
        let f = key_file("sk");
        let path = f.path().to_str().expect("utf-8 path");
        let e = apply(&["t", "--api_key", "sk", "--api_key_file", path])
            .unwrap_err()
            .to_string();
        assert!(e.contains("one way"), "{e}");
    }

    #[test]
    fn registration_limits_and_the_metrics_port_are_applied() {
        let (config, _) = apply(&[
            "t",
            "--worker_url_allowlist",
            "node1, node2",
            "--max_workers",
            "3",
            "--metrics_port",
            "9100",
        ])
        .expect("valid");
        assert_eq!(
            config.registration.allowlist,
            Some(vec!["node1".to_owned(), "node2".to_owned()])
        );
        assert_eq!(config.registration.max_workers, 3);
        assert_eq!(config.metrics_port, Some(9100));
        assert!(apply(&["t", "--metrics_port", "8000"]).is_err());
        assert!(apply(&["t", "--worker_url_allowlist", "a,,b"]).is_err());
        let (config, _) = apply(&["t"]).expect("valid");
        assert_eq!(config.registration.max_workers, DEFAULT_MAX_WORKERS);
        assert_eq!(config.registration.allowlist, None);
    }
}
