//! The console block against a golden file written with the original's own format strings
//! ("{:<40} {:<10.2f}" and friends) for a synthetic timeline whose figures are computed by hand.

use llmapi_bench::metrics::{Goodput, OutputTokenCounter, RequestOutput, calculate_metrics};
use llmapi_bench::report::{RunFacts, error_lines, render};

/// Counts whitespace-separated words (only reached when usage is missing, which it is not here).
struct WordCounter;
impl OutputTokenCounter for WordCounter {
    fn count_tokens(&self, text: &str) -> u64 {
        text.split_whitespace().count() as u64
    }
}

fn ok(ttft: f64, itl: &[f64], tokens: u64, prompt_len: u64) -> RequestOutput {
    RequestOutput {
        success: true,
        ttft,
        latency: ttft + itl.iter().sum::<f64>(),
        itl: itl.to_vec(),
        output_tokens: tokens,
        prompt_len,
        ..Default::default()
    }
}

#[test]
fn console_block_matches_the_original_layout() {
    let outputs = vec![
        ok(0.100, &[0.010, 0.010, 0.010], 4, 10),
        ok(0.200, &[0.020, 0.040], 3, 20),
        RequestOutput {
            exception_type: Some("ClientPayloadError".into()),
            error: "response stream broke".into(),
            prompt_len: 30,
            ..Default::default()
        },
    ];
    let slo = Goodput {
        ttft_ms: Some(150.0),
        ..Default::default()
    };
    let (m, lens) = calculate_metrics(&outputs, 2.0, &WordCounter, &[99.0, 99.9], &slo);
    let selected: Vec<String> = ["e2el", "ttft", "itl", "tpot"].map(String::from).to_vec();
    let facts = RunFacts {
        duration: 2.0,
        outputs: &outputs,
        output_lens: &lens,
        selected: &selected,
        has_goodput: true,
    };
    let (block, result) = render(&m, &facts);
    let golden = include_str!("golden/console_block.txt");
    assert_eq!(block, golden);
    assert_eq!(
        error_lines(&m),
        "Error type: ClientPayloadError, Count: 1 requests\nTotal failed requests: 1\n"
    );
    assert_eq!(
        result
            .get("p99.9_itl_ms")
            .and_then(|v| v.as_f64())
            .map(|v| (v * 100.0).round()),
        Some(3992.0)
    );
    assert_eq!(
        result.get("request_goodput:").and_then(|v| v.as_f64()),
        Some(0.5)
    );
}
