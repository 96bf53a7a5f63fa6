//! The fault and load suite (`llmapi-chaos`, docs/reliability.md) at its small scale: each of
//! the six faults against real processes on loopback, one after another (together they would
//! starve each other of the two cores CI has).

use llmapi_tests::chaos::{self, Config};

#[test]
fn every_fault_of_the_suite_loses_no_request() {
    let cfg = Config {
        model: llmapi_tests::bench_model().to_path_buf(),
        model_name: "bench".into(),
        full: false,
    };
    let reports = chaos::run(&cfg, &[]);
    let table = chaos::table(&reports);
    println!("{table}");
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(chaos::describe)
        .collect();
    assert!(failed.is_empty(), "{table}\n{}", failed.join("\n"));
}
