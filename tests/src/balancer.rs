//! The load balancers of deploy/ (nginx, HAProxy) run for tests in front of two routers, with
//! their configs as shipped but for the addresses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Proc, free_port, request, wait_until};

/// Which load balancer runs in front.
#[derive(Clone, Copy, Debug)]
pub enum Balancer {
    /// deploy/nginx/llmapi.conf under nginx.
    Nginx,
    /// deploy/haproxy/llmapi.cfg under HAProxy.
    Haproxy,
}

/// A running balancer; stopped (and its directory removed) when dropped.
pub struct Running {
    /// The balancer's process.
    pub proc: Proc,
    /// Where clients reach it (127.0.0.1).
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Running {
    /// The balancer's own log (nginx's error log included).
    pub fn log(&self) -> String {
        let mut log = std::fs::read_to_string(&self.proc.log).unwrap_or_default();
        if let Ok(errors) = std::fs::read_to_string(self._dir.path().join("error.log")) {
            log.push_str(&errors);
        }
        log
    }
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Whether the balancer's executable is installed; CI requires it (LLMAPI_REQUIRE_LB=1).
pub fn installed(b: Balancer) -> bool {
    let exe = match b {
        Balancer::Nginx => "nginx",
        Balancer::Haproxy => "haproxy",
    };
    let found = Command::new(exe).arg("-v").output().is_ok();
    if !found {
        assert!(
            std::env::var("LLMAPI_REQUIRE_LB").is_err(),
            "{exe} is not installed and LLMAPI_REQUIRE_LB is set (apt-get install nginx-light haproxy)"
        );
        eprintln!("{exe} is not installed: skipping");
    }
    found
}

/// Starts balancer `b` in front of the two routers on `routers` (127.0.0.1); waits until its
/// /health answers 200.
pub fn start(b: Balancer, routers: [u16; 2]) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let rewrite = |text: String| {
        text.replace("127.0.0.1:8001", &format!("127.0.0.1:{}", routers[0]))
            .replace("127.0.0.1:8002", &format!("127.0.0.1:{}", routers[1]))
            .replace("listen 8000;", &format!("listen 127.0.0.1:{port};"))
            .replace("bind :8000", &format!("bind 127.0.0.1:{port}"))
    };
    let d = dir.path();
    let proc = match b {
        Balancer::Nginx => {
            let site = rewrite(
                std::fs::read_to_string(repo_file("deploy/nginx/llmapi.conf")).expect("conf"),
            );
            std::fs::write(d.join("llmapi.conf"), site).expect("write");
            // Worker processes run as nobody when the test runs as root: their temp
            // directories must be theirs to write.
            for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
                std::fs::create_dir(d.join(t)).expect("mkdir");
                let _ = Command::new("chmod").arg("777").arg(d.join(t)).status();
            }
            let _ = Command::new("chmod").arg("755").arg(d).status();
            let main = format!(
                "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections 512; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                 include {d}/llmapi.conf;\n}}\n",
                d = d.display()
            );
            std::fs::write(d.join("nginx.conf"), main).expect("write");
            let mut cmd = Command::new("nginx");
            cmd.arg("-p")
                .arg(d)
                .arg("-e")
                .arg(d.join("error.log"))
                .arg("-c")
                .arg(d.join("nginx.conf"));
            Proc::spawn(&format!("nginx-{port}"), cmd)
        }
        Balancer::Haproxy => {
            let cfg = format!(
                "global\n    maxconn 1024\n\n{}",
                rewrite(
                    std::fs::read_to_string(repo_file("deploy/haproxy/llmapi.cfg")).expect("cfg")
                )
            );
            std::fs::write(d.join("haproxy.cfg"), cfg).expect("write");
            let mut cmd = Command::new("haproxy");
            cmd.arg("-db").arg("-f").arg(d.join("haproxy.cfg"));
            Proc::spawn(&format!("haproxy-{port}"), cmd)
        }
    };
    let running = Running {
        proc,
        port,
        _dir: dir,
    };
    let up = wait_until(Duration::from_secs(30), || {
        request(port, "GET", "/health", None, &[]).is_ok_and(|r| r.status == 200)
    });
    assert!(up, "{b:?} never answered /health: {}", running.log());
    running
}
