//! How much host memory this process may still use: `MemAvailable` of /proc/meminfo and the
//! limits of the process's own memory cgroup (v2 `memory.max` / `memory.current` of its cgroup
//! and every ancestor; v1 `memory.limit_in_bytes` where only v1 is mounted).
//!
//! Read from a [`MemorySource`] whose roots tests point at a fake /proc and /sys/fs/cgroup
//! tree. Not for: deciding what the memory is spent on (`budget`).

use std::path::{Path, PathBuf};

/// Where the memory facts are read: the real /proc and /sys/fs/cgroup by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemorySource {
    /// The proc filesystem (`meminfo`, `self/cgroup`).
    pub proc_root: PathBuf,
    /// Where the cgroup filesystem is mounted.
    pub cgroup_root: PathBuf,
}

impl Default for MemorySource {
    fn default() -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        }
    }
}

/// The tightest memory cgroup over this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMemory {
    /// The limiting cgroup's directory.
    pub path: PathBuf,
    /// Its limit in bytes.
    pub max: u64,
    /// Bytes charged to it that cannot simply be dropped: `memory.current` less the inactive
    /// file cache of `memory.stat` (the working set, as the kubelet counts it).
    pub in_use: u64,
}

impl CgroupMemory {
    /// Bytes the cgroup can still be charged before its limit.
    pub fn headroom(&self) -> u64 {
        self.max.saturating_sub(self.in_use)
    }
}

/// Host memory facts at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMemory {
    /// `MemTotal` of /proc/meminfo.
    pub mem_total: u64,
    /// `MemAvailable` of /proc/meminfo: what new allocations can get without swapping.
    pub mem_available: u64,
    /// The limiting memory cgroup, when one has a limit.
    pub cgroup: Option<CgroupMemory>,
}

impl HostMemory {
    /// Bytes this process can still allocate: the smaller of `MemAvailable` and the cgroup's
    /// headroom.
    pub fn free(&self) -> u64 {
        match &self.cgroup {
            Some(c) => self.mem_available.min(c.headroom()),
            None => self.mem_available,
        }
    }
}

/// Why the memory facts could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read host memory from {path}: {reason}")]
pub struct ProbeError {
    /// The file that failed.
    pub path: PathBuf,
    /// What went wrong.
    pub reason: String,
}

/// Values at or above this are "no limit" (cgroup v1 writes 2^63 rounded down to a page).
const V1_UNLIMITED: u64 = 1 << 62;

impl MemorySource {
    /// Reads the facts now. /proc/meminfo must be readable; a missing or unreadable cgroup
    /// tree means no cgroup limit.
    pub fn probe(&self) -> Result<HostMemory, ProbeError> {
        let path = self.proc_root.join("meminfo");
        let text = std::fs::read_to_string(&path).map_err(|e| ProbeError {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let field = |name: &str| {
            meminfo_kib(&text, name)
                .map(|k| k * 1024)
                .ok_or_else(|| ProbeError {
                    path: path.clone(),
                    reason: format!("no `{name}:` line"),
                })
        };
        Ok(HostMemory {
            mem_total: field("MemTotal")?,
            mem_available: field("MemAvailable")?,
            cgroup: self.cgroup(),
        })
    }

    /// The cgroup with the least headroom among this process's cgroup and its ancestors.
    fn cgroup(&self) -> Option<CgroupMemory> {
        let text = std::fs::read_to_string(self.proc_root.join("self/cgroup")).ok()?;
        if let Some(rel) = text.lines().find_map(|l| l.strip_prefix("0::")) {
            let found = self.tightest(&self.cgroup_root, rel, v2_limit);
            if found.is_some() || self.cgroup_root.join("cgroup.controllers").is_file() {
                return found;
            }
        }
        // Hybrid or v1-only hierarchy: the memory controller has its own mount.
        let rel = text.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then_some(path)
        })?;
        self.tightest(&self.cgroup_root.join("memory"), rel, v1_limit)
    }

    /// Walks from `root/rel` up to `root`, keeping the level with the least headroom.
    fn tightest(
        &self,
        root: &Path,
        rel: &str,
        limit: fn(&Path) -> Option<CgroupMemory>,
    ) -> Option<CgroupMemory> {
        let mut dir = root.join(rel.trim_start_matches('/'));
        // Inside a cgroup namespace the listed path may not exist under the mount; the
        // namespace's own cgroup is then the mount root.
        if !dir.is_dir() {
            dir = root.to_path_buf();
        }
        let mut best: Option<CgroupMemory> = None;
        loop {
            if let Some(c) = limit(&dir)
                && best.as_ref().is_none_or(|b| c.headroom() < b.headroom())
            {
                best = Some(c);
            }
            if dir == root {
                return best;
            }
            match dir.parent() {
                Some(p) if p.starts_with(root) => dir = p.to_path_buf(),
                _ => return best,
            }
        }
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `inactive_file` (v2) or `total_inactive_file` (v1) of `memory.stat`, 0 when unreadable.
fn inactive_file(dir: &Path, key: &str) -> u64 {
    std::fs::read_to_string(dir.join("memory.stat"))
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok())?
            })
        })
        .unwrap_or(0)
}

fn v2_limit(dir: &Path) -> Option<CgroupMemory> {
    let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
    let max: u64 = match max.trim() {
        "max" => return None,
        v => v.parse().ok()?,
    };
    let current = read_u64(&dir.join("memory.current")).unwrap_or(0);
    Some(CgroupMemory {
        path: dir.to_path_buf(),
        max,
        in_use: current.saturating_sub(inactive_file(dir, "inactive_file")),
    })
}

fn v1_limit(dir: &Path) -> Option<CgroupMemory> {
    let max = read_u64(&dir.join("memory.limit_in_bytes")).filter(|&m| m < V1_UNLIMITED)?;
    let usage = read_u64(&dir.join("memory.usage_in_bytes")).unwrap_or(0);
    Some(CgroupMemory {
        path: dir.to_path_buf(),
        max,
        in_use: usage.saturating_sub(inactive_file(dir, "total_inactive_file")),
    })
}

/// The kB value of `name:` in /proc/meminfo text.
fn meminfo_kib(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
pub(crate) mod fake {
    //! A fake /proc and /sys/fs/cgroup tree in a temp dir.

    use super::MemorySource;
    use std::path::Path;

    /// Writes `meminfo` with `total` and `available` bytes and, when `cgroup` is given, a
    /// v2 tree placing this process in `/job/task` with those (`memory.max`,
    /// `memory.current`) files at the leaf and "max" above it.
    pub(crate) fn tree(
        dir: &Path,
        total: u64,
        available: u64,
        cgroup: Option<(&str, u64)>,
    ) -> MemorySource {
        let proc_root = dir.join("proc");
        let cgroup_root = dir.join("cgroup");
        std::fs::create_dir_all(proc_root.join("self")).unwrap();
        std::fs::write(
            proc_root.join("meminfo"),
            format!(
                "MemTotal:       {} kB\nMemFree:        1 kB\nMemAvailable:   {} kB\n",
                total / 1024,
                available / 1024
            ),
        )
        .unwrap();
        std::fs::write(proc_root.join("self/cgroup"), "0::/job/task\n").unwrap();
        let leaf = cgroup_root.join("job/task");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(cgroup_root.join("cgroup.controllers"), "cpu memory\n").unwrap();
        std::fs::write(cgroup_root.join("job/memory.max"), "max\n").unwrap();
        if let Some((max, current)) = cgroup {
            std::fs::write(leaf.join("memory.max"), format!("{max}\n")).unwrap();
            std::fs::write(leaf.join("memory.current"), format!("{current}\n")).unwrap();
        }
        MemorySource {
            proc_root,
            cgroup_root,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn no_cgroup_limit_leaves_mem_available() {
        let dir = tempfile::tempdir().unwrap();
        let src = fake::tree(dir.path(), 32 * GIB, 20 * GIB, Some(("max", 5 * GIB)));
        let m = src.probe().unwrap();
        assert_eq!((m.mem_total, m.mem_available), (32 * GIB, 20 * GIB));
        assert_eq!(m.cgroup, None);
        assert_eq!(m.free(), 20 * GIB);
    }

    #[test]
    fn a_cgroup_max_below_mem_available_bounds_free_memory() {
        let dir = tempfile::tempdir().unwrap();
        let src = fake::tree(
            dir.path(),
            32 * GIB,
            20 * GIB,
            Some(("8589934592", 3 * GIB)),
        );
        let m = src.probe().unwrap();
        let c = m.cgroup.as_ref().unwrap();
        assert_eq!((c.max, c.in_use), (8 * GIB, 3 * GIB));
        assert!(c.path.ends_with("job/task"));
        assert_eq!(m.free(), 5 * GIB);
    }

    #[test]
    fn an_ancestor_limit_counts_and_inactive_file_cache_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let src = fake::tree(dir.path(), 32 * GIB, 20 * GIB, None);
        let job = src.cgroup_root.join("job");
        std::fs::write(job.join("memory.max"), format!("{}\n", 6 * GIB)).unwrap();
        std::fs::write(job.join("memory.current"), format!("{}\n", 4 * GIB)).unwrap();
        std::fs::write(
            job.join("memory.stat"),
            format!("anon 1\nactive_file 2\ninactive_file {}\n", GIB),
        )
        .unwrap();
        let m = src.probe().unwrap();
        let c = m.cgroup.unwrap();
        assert!(c.path.ends_with("job"));
        assert_eq!(c.in_use, 3 * GIB);
        assert_eq!(c.headroom(), 3 * GIB);
    }

    #[test]
    fn cgroup_v1_limit_is_read_where_v2_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let src = fake::tree(dir.path(), 32 * GIB, 20 * GIB, None);
        std::fs::remove_file(src.cgroup_root.join("cgroup.controllers")).unwrap();
        std::fs::write(
            src.proc_root.join("self/cgroup"),
            "4:memory:/pod\n1:cpu:/\n0::/\n",
        )
        .unwrap();
        let pod = src.cgroup_root.join("memory/pod");
        std::fs::create_dir_all(&pod).unwrap();
        std::fs::write(pod.join("memory.limit_in_bytes"), format!("{}\n", 2 * GIB)).unwrap();
        std::fs::write(pod.join("memory.usage_in_bytes"), format!("{}\n", GIB)).unwrap();
        std::fs::write(
            src.cgroup_root.join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        assert_eq!(src.probe().unwrap().free(), GIB);
    }

    #[test]
    fn missing_meminfo_names_the_file() {
        let src = MemorySource {
            proc_root: PathBuf::from("/nonexistent-proc"),
            cgroup_root: PathBuf::from("/nonexistent-cgroup"),
        };
        let e = src.probe().unwrap_err().to_string();
        assert!(e.contains("/nonexistent-proc/meminfo"), "{e}");
    }
}
