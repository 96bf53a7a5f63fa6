//! Picking a TCP port for a listener that another process (or thread) will open later.
//!
//! A port taken from the kernel with `bind(":0")` and released at once lies in the ephemeral
//! range, the same range the kernel hands to every outgoing connection: between the release
//! and the later `bind`, any connection on the host may take it ("Address already in use").
//! [`free_port`] picks below that range instead, where only explicit binds land, and never
//! hands out the same port twice in one process.

use std::collections::HashSet;
use std::net::{IpAddr, TcpListener};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where ports are picked when the ephemeral range cannot be read (Linux's default start).
const DEFAULT_EPHEMERAL_START: u16 = 32768;
/// The lowest port picked: above the registered services most hosts run.
const LOWEST: u16 = 20000;
/// How many candidates are tried before giving up.
const TRIES: u32 = 500;

/// Calls so far in this process: each starts its search further on.
static CALLS: AtomicU32 = AtomicU32::new(0);
/// Ports this process has handed out.
static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port that `host` can bind now, below the kernel's ephemeral range, and that this process
/// has not handed out before. Falls back to a kernel-chosen port where no such range exists.
pub fn free_port(host: IpAddr) -> std::io::Result<u16> {
    let top = ephemeral_start().unwrap_or(DEFAULT_EPHEMERAL_START);
    if top <= LOWEST + 1000 {
        return kernel_port(host);
    }
    let span = u32::from(top - LOWEST);
    // A start that differs between processes, so that two test binaries or launchers picking
    // at once rarely probe the same ports.
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    for i in 0..TRIES {
        let offset = (seed % span + call.wrapping_mul(7919) + i) % span;
        let port = LOWEST + offset as u16;
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        let given = given.get_or_insert_with(HashSet::new);
        if !given.contains(&port) && TcpListener::bind((host, port)).is_ok() {
            given.insert(port);
            return Ok(port);
        }
    }
    kernel_port(host)
}

fn kernel_port(host: IpAddr) -> std::io::Result<u16> {
    Ok(TcpListener::bind((host, 0))?.local_addr()?.port())
}

/// The first port of the kernel's ephemeral range (Linux).
fn ephemeral_start() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn ports_are_bindable_distinct_and_outside_the_ephemeral_range() {
        let host = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let top = ephemeral_start().unwrap_or(DEFAULT_EPHEMERAL_START);
        let ports: Vec<u16> = (0..50).map(|_| free_port(host).unwrap()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            ports.len(),
            "a port handed out twice: {ports:?}"
        );
        for port in ports {
            assert!(
                (LOWEST..top).contains(&port),
                "{port} is in the ephemeral range"
            );
            TcpListener::bind((host, port)).unwrap();
        }
    }
}
