//! The fault and load suite: real binaries on loopback, one fault each, every request's
//! ending classified, printed as a table (`scripts/chaos.sh`, `llmapi-chaos`).
//!
//! A scenario passes when no request was lost (cut without an answer) or hung (no ending
//! within the client's limit) and each of its checks held. Errors the fault explains (a 504
//! from a stalled worker, a 429 past the in-flight limit) are counted, not failures; a killed
//! worker's streams migrate and end in no error at all.

pub mod load;
pub mod scenarios;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use load::Tally;

/// What the suite runs against.
#[derive(Debug, Clone)]
pub struct Config {
    /// The model directory every worker and the router load.
    pub model: PathBuf,
    /// Its served name.
    pub model_name: String,
    /// Full scale (the figures: c=32, 1,000 clients) instead of the small one CI runs.
    pub full: bool,
}

impl Config {
    /// `small` or `full` by the configured scale.
    pub fn scale(&self, small: usize, full: usize) -> usize {
        if self.full { full } else { small }
    }
}

/// One scenario's result.
#[derive(Debug, Clone)]
pub struct Report {
    /// Short name.
    pub name: String,
    /// The load held.
    pub load: String,
    /// The fault injected.
    pub fault: String,
    /// How the requests ended.
    pub tally: Tally,
    /// Named checks and whether they held.
    pub checks: Vec<(String, bool)>,
    /// Wall time.
    pub took: Duration,
}

impl Report {
    /// A report with no time yet.
    pub fn new(
        name: impl Into<String>,
        load: impl Into<String>,
        fault: impl Into<String>,
        tally: Tally,
        checks: Vec<(String, bool)>,
    ) -> Self {
        Report {
            name: name.into(),
            load: load.into(),
            fault: fault.into(),
            tally,
            checks,
            took: Duration::ZERO,
        }
    }

    /// A scenario that could not run to its end (its set-up failed or it panicked).
    fn aborted(name: &str, why: String) -> Self {
        Report::new(name, "-", "-", Tally::default(), vec![(why, false)])
    }

    /// No request lost or hung and every check held.
    pub fn passed(&self) -> bool {
        self.tally.lost == 0 && self.tally.hung == 0 && self.checks.iter().all(|(_, ok)| *ok)
    }
}

/// A scenario: runs its cluster, fault and load, and reports.
pub type Scenario = fn(&Config) -> Report;

/// The scenarios by number (1-based, the order).
pub const SCENARIOS: [(&str, Scenario); 6] = [
    ("kill", scenarios::kill_worker),
    ("stop", scenarios::stop_worker),
    ("disconnect", scenarios::disconnects),
    ("overload", scenarios::overload),
    ("poison", scenarios::poison),
    ("drain", scenarios::drain),
];

/// Runs the scenarios named in `only` (all when empty), each to its end even if one before
/// it failed; prints each as it finishes.
pub fn run(cfg: &Config, only: &[String]) -> Vec<Report> {
    let mut reports = Vec::new();
    for (name, scenario) in SCENARIOS {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        eprintln!("chaos: running {name}");
        let start = Instant::now();
        let mut report = std::panic::catch_unwind(|| scenario(cfg)).unwrap_or_else(|p| {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panicked".into());
            Report::aborted(name, format!("aborted: {why}"))
        });
        report.took = start.elapsed();
        eprintln!("{}", describe(&report));
        reports.push(report);
    }
    reports
}

/// A report's checks, one per line.
pub fn describe(r: &Report) -> String {
    let mut s = format!(
        "chaos: {} {} in {:.0} s\n",
        r.name,
        if r.passed() { "passed" } else { "FAILED" },
        r.took.as_secs_f64()
    );
    for (what, ok) in &r.checks {
        s.push_str(&format!("  [{}] {what}\n", if *ok { "ok" } else { "FAIL" }));
    }
    s
}

/// The reports as a Markdown table.
pub fn table(reports: &[Report]) -> String {
    let mut s = String::from(
        "| # | scenario | load held | fault | completed | errors (explained) | lost | hung | checks | result |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (i, r) in reports.iter().enumerate() {
        let held = r.checks.iter().filter(|(_, ok)| *ok).count();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {}/{} | {} |\n",
            i + 1,
            r.name,
            r.load,
            r.fault,
            r.tally.completed,
            r.tally.errors(),
            r.tally.lost,
            r.tally.hung,
            held,
            r.checks.len(),
            if r.passed() { "pass" } else { "FAIL" }
        ));
    }
    s
}
