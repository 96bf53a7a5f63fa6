//! llmapi-chaos: the fault and load suite against the real binaries on loopback, printed as a
//! Markdown table. `scripts/chaos.sh` builds and runs it; see docs/reliability.md.
//!
//! Usage: llmapi-chaos [--full] [--model demo|bench|DIR] [--only kill,stop,...]

use std::path::PathBuf;

use llmapi_tests::chaos::{self, Config, SCENARIOS};

fn usage() -> ! {
    let names: Vec<&str> = SCENARIOS.iter().map(|(n, _)| *n).collect();
    eprintln!(
        "usage: llmapi-chaos [--full] [--model demo|bench|DIR] [--only NAME,...]\n\
         scenarios: {}",
        names.join(", ")
    );
    std::process::exit(2);
}

fn main() {
    let mut full = false;
    let mut model = "bench".to_owned();
    let mut only = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--full" => full = true,
            "--model" => model = args.next().unwrap_or_else(|| usage()),
            "--only" => {
                let list = args.next().unwrap_or_else(|| usage());
                only = list.split(',').map(str::to_owned).collect();
            }
            _ => usage(),
        }
    }
    for o in &only {
        if !SCENARIOS.iter().any(|(n, _)| n == o) {
            eprintln!("llmapi-chaos: no scenario {o:?}");
            usage();
        }
    }
    let (dir, name) = match model.as_str() {
        "bench" => (
            llmapi_tests::bench_model().to_path_buf(),
            "bench".to_owned(),
        ),
        "demo" => (llmapi_tests::demo_model().to_path_buf(), "demo".to_owned()),
        path => {
            let dir = PathBuf::from(path);
            let name = dir
                .file_name()
                .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
            (dir, name)
        }
    };
    let cfg = Config {
        model: dir,
        model_name: name,
        full,
    };
    let reports = chaos::run(&cfg, &only);
    println!("{}", chaos::table(&reports));
    let failed = reports.iter().filter(|r| !r.passed()).count();
    println!("{} passed, {} failed", reports.len() - failed, failed);
    std::process::exit(i32::from(failed > 0));
}
