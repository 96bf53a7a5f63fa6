//! Benchmark prompts: random token ids, ShareGPT conversations, custom JSON lines.
//!
//! Sampling follows benchmark_dataset.py: random prompts are `prefix + (offset + i + k) % vocab`
//! with lengths drawn from `[len * (1 - r), len * (1 + r)]`; ShareGPT keeps the first two turns
//! and prunes too short or too long pairs; custom lines give a user message and max_tokens. The
//! random generator is ChaCha8 seeded with --seed, so runs repeat exactly but do not reproduce
//! the Python script's torch/numpy draws.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::args::{BenchArgs, DatasetName};
use crate::tokenizer::TokenCodec;

/// A prompt as sent: text, or token ids with --tokenize-on-client.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Prompt text.
    Text(String),
    /// Prompt token ids.
    Ids(Vec<u32>),
}

/// One request to send.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Prompt length in tokens.
    pub prompt_len: u64,
    /// max_tokens to ask for.
    pub expected_output_len: u32,
}

/// A dataset that cannot be read or sampled.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The file is missing or unreadable.
    #[error("cannot read dataset '{path}': {source}; check --dataset-path")]
    Read {
        /// The path given.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file's content is not what the dataset expects.
    #[error("dataset '{path}' is malformed: {detail}")]
    Malformed {
        /// The path given.
        path: String,
        /// What is wrong and where.
        detail: String,
    },
    /// A flag combination the dataset cannot serve.
    #[error("{0}")]
    Usage(String),
    /// The tokenizer failed on a prompt.
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
}

/// Samples `args.num_prompts` requests from the dataset the flags name.
pub fn sample(
    args: &BenchArgs,
    codec: &dyn TokenCodec,
) -> Result<Vec<SampleRequest>, DatasetError> {
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    match args.dataset_name {
        DatasetName::Random => sample_random(args, codec, &mut rng),
        DatasetName::Sharegpt => {
            let path = args.dataset_path.as_deref().ok_or_else(|| {
                DatasetError::Usage(
                    "--dataset-name sharegpt needs --dataset-path FILE.json (nothing is \
                     downloaded); or use --dataset-name random"
                        .into(),
                )
            })?;
            let pairs = load_sharegpt(path)?;
            sample_sharegpt(pairs, args, codec, &mut rng)
        }
        DatasetName::Custom => {
            let path = args.dataset_path.as_deref().ok_or_else(|| {
                DatasetError::Usage("--dataset-name custom needs --dataset-path FILE.jsonl".into())
            })?;
            sample_custom(path, args.num_prompts, codec, &mut rng)
        }
    }
}

fn length_range(len: u32, ratio: f64) -> (u32, u32) {
    (
        (len as f64 * (1.0 - ratio)) as u32,
        (len as f64 * (1.0 + ratio)) as u32,
    )
}

/// Rounds of decode, re-encode and trim or pad before a text prompt takes the closest length.
const EXACT_LEN_ROUNDS: usize = 8;

/// The prompt as sent and its length as the server counts it. Ids go as they are
/// (--tokenize-on-client). Text is made to encode to exactly `target` tokens with the special
/// tokens /v1/completions adds (BOS): random ids decoded to text and encoded again are not the
/// same count, so the text is re-encoded and its ids trimmed, or padded with `pad(k)`, until it
/// holds (at most [`EXACT_LEN_ROUNDS`] times; then the closest length is kept and reported).
fn finish_prompt(
    ids: Vec<u32>,
    target: usize,
    pad: impl Fn(usize) -> u32,
    args: &BenchArgs,
    codec: &dyn TokenCodec,
) -> Result<(Prompt, u64), DatasetError> {
    if args.tokenize_on_client {
        let len = ids.len() as u64;
        return Ok((Prompt::Ids(ids), len));
    }
    let encode = |t: &str, special: bool| codec.encode(t, special).map_err(DatasetError::Tokenizer);
    let decode = |ids: &[u32]| codec.decode(ids).map_err(DatasetError::Tokenizer);
    let mut ids = ids;
    let mut best: Option<(String, usize)> = None;
    for _ in 0..EXACT_LEN_ROUNDS {
        let text = decode(&ids)?;
        let body = encode(&text, false)?;
        let sent = encode(&text, true)?.len();
        let miss = sent.abs_diff(target);
        if best
            .as_ref()
            .is_none_or(|(_, len)| len.abs_diff(target) > miss)
        {
            best = Some((text, sent));
        }
        if miss == 0 {
            break;
        }
        let special = sent.saturating_sub(body.len());
        let want = target.saturating_sub(special);
        ids = body;
        if ids.len() > want {
            ids.truncate(want);
        } else {
            let have = ids.len();
            ids.extend((have..want).map(&pad));
        }
    }
    let (text, len) = best.unwrap_or_default();
    Ok((Prompt::Text(text), len as u64))
}

fn sample_random(
    args: &BenchArgs,
    codec: &dyn TokenCodec,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<SampleRequest>, DatasetError> {
    let vocab = codec.vocab_size() as u64;
    if vocab == 0 {
        return Err(DatasetError::Usage(
            "the tokenizer has an empty vocabulary".into(),
        ));
    }
    let n = args.num_prompts;
    let prefixes: Vec<Vec<u32>> = (0..args.random_num_prefixes.max(1))
        .map(|_| {
            (0..args.random_prefix_len)
                .map(|_| rng.random_range(0..vocab) as u32)
                .collect()
        })
        .collect();
    // One prefix keeps the draws (and so the prompts) of runs before prefixes could vary.
    let prefix_of: Vec<usize> = if prefixes.len() == 1 {
        vec![0; n]
    } else {
        (0..n)
            .map(|_| rng.random_range(0..prefixes.len()))
            .collect()
    };
    let (in_lo, in_hi) = length_range(args.random_input_len, args.random_range_ratio);
    let (out_lo, out_hi) = length_range(args.random_output_len, args.random_range_ratio);
    let input_lens: Vec<u32> = (0..n).map(|_| rng.random_range(in_lo..=in_hi)).collect();
    let output_lens: Vec<u32> = (0..n).map(|_| rng.random_range(out_lo..=out_hi)).collect();
    let offsets: Vec<u64> = (0..n).map(|_| rng.random_range(0..vocab)).collect();

    // With a dataset file and no --random-ids, real text is cut to length, as the original does.
    let texts = match (&args.dataset_path, args.random_ids) {
        (Some(path), false) => Some(load_sharegpt(path)?),
        _ => None,
    };
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let len = input_lens[i] as usize;
        let body: Vec<u32> = match &texts {
            None => (0..len as u64)
                .map(|k| ((offsets[i] + i as u64 + k) % vocab) as u32)
                .collect(),
            Some(pairs) => text_ids_of_len(&pairs[i % pairs.len()].0, len, codec)?,
        };
        let ids: Vec<u32> = prefixes[prefix_of[i]].iter().copied().chain(body).collect();
        let target = ids.len();
        // Padding continues the prompt's run of consecutive ids.
        let pad = |k: usize| ((offsets[i] + i as u64 + k as u64) % vocab) as u32;
        let (prompt, prompt_len) = finish_prompt(ids, target, pad, args, codec)?;
        out.push(SampleRequest {
            prompt,
            prompt_len,
            expected_output_len: output_lens[i],
        });
    }
    Ok(out)
}

/// One line comparing the requested random input length with what the prompts measure as the
/// server counts them (BOS included), printed before a random-dataset run.
pub fn input_length_line(args: &BenchArgs, requests: &[SampleRequest]) -> String {
    let lens = requests.iter().map(|r| r.prompt_len);
    let (min, max) = (
        lens.clone().min().unwrap_or(0),
        lens.clone().max().unwrap_or(0),
    );
    let mean = lens.sum::<u64>() as f64 / requests.len().max(1) as f64;
    let requested = args.random_prefix_len + args.random_input_len;
    let how = if args.tokenize_on_client {
        "token ids sent as they are"
    } else {
        "text re-encoded to length, special tokens included"
    };
    format!(
        "Input length: requested {requested} tokens per prompt (prefix {} of {} distinct, range \
         ratio {}); measured mean {mean:.1}, min {min}, max {max} ({how})",
        args.random_prefix_len, args.random_num_prefixes, args.random_range_ratio
    )
}

/// Token ids of `text` repeated until at least `len` tokens, cut to `len`.
fn text_ids_of_len(
    text: &str,
    len: usize,
    codec: &dyn TokenCodec,
) -> Result<Vec<u32>, DatasetError> {
    let mut ids = codec.encode(text, false).map_err(DatasetError::Tokenizer)?;
    if ids.is_empty() {
        ids.push(0);
    }
    let base = ids.clone();
    while ids.len() < len {
        ids.extend_from_slice(&base);
    }
    ids.truncate(len);
    Ok(ids)
}

/// (prompt, completion) pairs: the first two turns of every conversation with at least two.
fn load_sharegpt(path: &str) -> Result<Vec<(String, String)>, DatasetError> {
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Read {
        path: path.into(),
        source,
    })?;
    let malformed = |detail: String| DatasetError::Malformed {
        path: path.into(),
        detail,
    };
    let data: Value = serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))?;
    let Value::Array(entries) = data else {
        return Err(malformed("expected a JSON array of conversations".into()));
    };
    let turn = |t: &Value| t.get("value").and_then(Value::as_str).map(str::to_string);
    let pairs: Vec<(String, String)> = entries
        .iter()
        .filter_map(|e| {
            let conv = e.get("conversations").or_else(|| e.get("conversation"))?;
            let conv = conv.as_array()?;
            Some((turn(conv.first()?)?, turn(conv.get(1)?)?))
        })
        .collect();
    if pairs.is_empty() {
        return Err(malformed(
            "no conversation with two turns ({\"conversations\": [{\"value\": ..}, ..]})".into(),
        ));
    }
    Ok(pairs)
}

fn sample_sharegpt(
    mut pairs: Vec<(String, String)>,
    args: &BenchArgs,
    codec: &dyn TokenCodec,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<SampleRequest>, DatasetError> {
    pairs.shuffle(rng);
    let mut out = Vec::with_capacity(args.num_prompts);
    for (prompt, completion) in pairs {
        if out.len() == args.num_prompts {
            break;
        }
        let prompt_ids = codec
            .encode(&prompt, true)
            .map_err(DatasetError::Tokenizer)?;
        let output_len = match args.sharegpt_output_len {
            Some(n) => n as usize,
            None => codec
                .encode(&completion, true)
                .map_err(DatasetError::Tokenizer)?
                .len(),
        };
        let (p, o) = (prompt_ids.len(), output_len);
        // The original's pruning: at least 4 tokens each, prompt <= 1024, total <= 2048.
        let too_short = p < 4 || (args.sharegpt_output_len.is_none() && o < 4);
        if too_short || p > 1024 || p + o > 2048 {
            continue;
        }
        let prompt = if args.tokenize_on_client {
            Prompt::Ids(prompt_ids)
        } else {
            Prompt::Text(prompt)
        };
        out.push(SampleRequest {
            prompt,
            prompt_len: p as u64,
            expected_output_len: o as u32,
        });
    }
    if out.is_empty() {
        return Err(DatasetError::Usage(
            "no ShareGPT conversation passed the length filter (prompt 4..=1024 tokens, \
             prompt + output <= 2048)"
                .into(),
        ));
    }
    // Too few valid conversations: repeat random ones, as the original's oversampling does.
    while out.len() < args.num_prompts {
        let pick = out[rng.random_range(0..out.len())].clone();
        out.push(pick);
    }
    Ok(out)
}

fn sample_custom(
    path: &str,
    num_prompts: usize,
    codec: &dyn TokenCodec,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<SampleRequest>, DatasetError> {
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Read {
        path: path.into(),
        source,
    })?;
    let mut entries = Vec::new();
    for (lineno, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let malformed = |detail: &str| DatasetError::Malformed {
            path: path.into(),
            detail: format!("line {}: {detail}", lineno + 1),
        };
        let v: Value = serde_json::from_str(line).map_err(|e| malformed(&e.to_string()))?;
        let input = v
            .get("input")
            .ok_or_else(|| malformed("no \"input\" object"))?;
        let messages = input
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed("no \"input.messages\" array"))?;
        let content = messages
            .iter()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .and_then(|m| m.get("content").and_then(Value::as_str))
            .ok_or_else(|| malformed("no user message with string content"))?;
        let max_tokens = input
            .get("max_tokens")
            .and_then(Value::as_u64)
            .ok_or_else(|| malformed("no integer \"input.max_tokens\""))?;
        entries.push((content.to_string(), max_tokens as u32));
    }
    if entries.is_empty() {
        return Err(DatasetError::Malformed {
            path: path.into(),
            detail: "no requests in the file".into(),
        });
    }
    entries.shuffle(rng);
    entries.truncate(num_prompts);
    entries
        .into_iter()
        .map(|(prompt, max_tokens)| {
            let len = codec
                .encode(&prompt, true)
                .map_err(DatasetError::Tokenizer)?
                .len();
            Ok(SampleRequest {
                prompt: Prompt::Text(prompt),
                prompt_len: len as u64,
                expected_output_len: max_tokens,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// A test double: word `wN` is token N; decoding joins words with spaces.
    struct WordCodec;
    impl TokenCodec for WordCodec {
        fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
            let bos = add_special_tokens.then_some(0);
            let words = text
                .split_whitespace()
                .map(|w| w.trim_start_matches('w').parse::<u32>().unwrap_or(1));
            Ok(bos.into_iter().chain(words).collect())
        }
        fn decode(&self, ids: &[u32]) -> Result<String, String> {
            Ok(ids
                .iter()
                .map(|i| format!("w{i}"))
                .collect::<Vec<_>>()
                .join(" "))
        }
        fn vocab_size(&self) -> usize {
            100
        }
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn args(extra: &[&str]) -> BenchArgs {
        let base = ["llmapi-bench", "--model", "m"];
        Cli::parse_from(base.iter().chain(extra)).args
    }

    #[test]
    fn random_prompts_start_with_one_of_the_distinct_prefixes() {
        let a = args(&[
            "--dataset-name",
            "random",
            "--num-prompts",
            "40",
            "--random-input-len",
            "5",
            "--random-prefix-len",
            "8",
            "--random-num-prefixes",
            "3",
            "--tokenize-on-client",
        ]);
        let reqs = sample(&a, &WordCodec).expect("sample");
        let prefixes: std::collections::BTreeSet<Vec<u32>> = reqs
            .iter()
            .map(|r| match &r.prompt {
                Prompt::Ids(ids) => ids[..8].to_vec(),
                Prompt::Text(_) => panic!("ids expected"),
            })
            .collect();
        assert_eq!(prefixes.len(), 3, "40 draws use each of 3 prefixes");
        assert!(reqs.iter().all(|r| r.prompt_len == 13));
    }

    #[test]
    fn random_ids_have_the_requested_lengths_prefix_and_wraparound() {
        let a = args(&[
            "--dataset-name",
            "random",
            "--num-prompts",
            "5",
            "--random-input-len",
            "150",
            "--random-output-len",
            "7",
            "--random-prefix-len",
            "3",
            "--tokenize-on-client",
        ]);
        let reqs = sample(&a, &WordCodec).expect("sample");
        assert_eq!(reqs.len(), 5);
        let prefix = match &reqs[0].prompt {
            Prompt::Ids(ids) => ids[..3].to_vec(),
            Prompt::Text(_) => panic!("ids expected"),
        };
        for (i, r) in reqs.iter().enumerate() {
            assert_eq!((r.prompt_len, r.expected_output_len), (153, 7));
            let Prompt::Ids(ids) = &r.prompt else {
                panic!("ids expected")
            };
            assert_eq!(ids.len(), 153);
            assert_eq!(ids[..3], prefix[..], "request {i} shares the prefix");
            // Consecutive ids modulo the vocabulary after the prefix.
            assert!(ids[3..].windows(2).all(|w| w[1] == (w[0] + 1) % 100));
            assert!(ids.iter().all(|&t| t < 100));
        }
        assert_eq!(
            sample(&a, &WordCodec).expect("again"),
            reqs,
            "same seed, same prompts"
        );
    }

    #[test]
    fn range_ratio_bounds_the_lengths_and_text_prompts_decode() {
        let a = args(&[
            "--dataset-name",
            "random",
            "--num-prompts",
            "200",
            "--random-input-len",
            "100",
            "--random-output-len",
            "10",
            "--random-range-ratio",
            "0.5",
        ]);
        let reqs = sample(&a, &WordCodec).expect("sample");
        assert!(reqs.iter().all(|r| (50..=150).contains(&r.prompt_len)));
        assert!(
            reqs.iter()
                .all(|r| (5..=15).contains(&r.expected_output_len))
        );
        assert!(reqs.iter().any(|r| r.prompt_len != reqs[0].prompt_len));
        let Prompt::Text(t) = &reqs[0].prompt else {
            panic!("text expected")
        };
        let sent = WordCodec.encode(t, true).expect("encode").len() as u64;
        assert_eq!(
            sent, reqs[0].prompt_len,
            "the BOS counts as the server counts it"
        );
    }

    /// Letters a..z are ids 0..25 and "yz" is id 26: random runs of consecutive ids decode to
    /// text that encodes to fewer tokens, as real BPE merges do; BOS is id 27.
    struct MergingCodec;
    impl TokenCodec for MergingCodec {
        fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
            let mut ids: Vec<u32> = add_special_tokens.then_some(27).into_iter().collect();
            let b = text.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i..].starts_with(b"yz") {
                    ids.push(26);
                    i += 2;
                } else {
                    ids.push(u32::from(b[i] - b'a'));
                    i += 1;
                }
            }
            Ok(ids)
        }
        fn decode(&self, ids: &[u32]) -> Result<String, String> {
            Ok(ids
                .iter()
                .map(|&i| match i {
                    26 => "yz".to_owned(),
                    27 => String::new(),
                    i => char::from(b'a' + i as u8).to_string(),
                })
                .collect())
        }
        fn vocab_size(&self) -> usize {
            26
        }
    }

    #[test]
    fn random_text_prompts_encode_to_exactly_the_requested_length() {
        let a = args(&[
            "--dataset-name",
            "random",
            "--num-prompts",
            "20",
            "--random-input-len",
            "300",
            "--random-prefix-len",
            "5",
        ]);
        let reqs = sample(&a, &MergingCodec).expect("sample");
        for (i, r) in reqs.iter().enumerate() {
            let Prompt::Text(t) = &r.prompt else {
                panic!("text expected")
            };
            let naive =
                MergingCodec.decode(&(0..305u32).map(|k| (k + i as u32) % 26).collect::<Vec<_>>());
            let naive_len = MergingCodec
                .encode(&naive.expect("decode"), true)
                .expect("encode")
                .len();
            assert_ne!(
                naive_len, 305,
                "the double must merge tokens for this test to mean anything"
            );
            let sent = MergingCodec.encode(t, true).expect("encode").len();
            assert_eq!((sent, r.prompt_len), (305, 305), "request {i}");
        }
    }

    #[test]
    fn sharegpt_keeps_valid_first_turn_pairs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sg.json");
        let long = vec!["w5"; 2000].join(" ");
        let data = serde_json::json!([
            {"conversations": [{"value": "w1 w2 w3 w4"}, {"value": "w5 w6 w7 w8"}]},
            {"conversations": [{"value": "w1"}, {"value": "w5 w6 w7 w8"}]},
            {"conversations": [{"value": long}, {"value": "w5 w6 w7 w8"}]},
            {"conversations": [{"value": "only one turn"}]}
        ]);
        std::fs::write(&path, data.to_string()).expect("write");
        let p = path.to_str().expect("utf8");
        let a = args(&["--dataset-path", p, "--num-prompts", "3"]);
        let reqs = sample(&a, &WordCodec).expect("sample");
        // Only the first conversation passes (the second is too short, the third too long);
        // it is repeated to reach --num-prompts.
        assert_eq!(reqs.len(), 3);
        assert!(
            reqs.iter()
                .all(|r| r.prompt_len == 5 && r.expected_output_len == 5)
        );
        let fixed = args(&[
            "--dataset-path",
            p,
            "--num-prompts",
            "1",
            "--sharegpt-output-len",
            "2",
        ]);
        assert_eq!(
            sample(&fixed, &WordCodec).expect("sample")[0].expected_output_len,
            2
        );
    }

    #[test]
    fn custom_jsonl_reads_user_messages_and_names_bad_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.jsonl");
        let line = |content: &str, max: u32| {
            serde_json::json!({"input": {"messages": [{"role": "system", "content": ""},
                {"role": "user", "content": content}], "max_tokens": max}})
            .to_string()
        };
        std::fs::write(
            &path,
            format!("{}\n\n{}\n", line("w1 w2", 9), line("w3", 4)),
        )
        .expect("write");
        let p = path.to_str().expect("utf8");
        let a = args(&[
            "--dataset-name",
            "custom",
            "--dataset-path",
            p,
            "--num-prompts",
            "5",
        ]);
        let mut reqs = sample(&a, &WordCodec).expect("sample");
        reqs.sort_by_key(|r| r.expected_output_len);
        assert_eq!(reqs.len(), 2);
        assert_eq!((reqs[0].prompt_len, reqs[0].expected_output_len), (2, 4));
        assert_eq!((reqs[1].prompt_len, reqs[1].expected_output_len), (3, 9));

        std::fs::write(&path, format!("{}\n{{\"input\": {{}}}}\n", line("w1", 1))).expect("write");
        let err = sample(&a, &WordCodec).expect_err("malformed").to_string();
        assert!(
            err.contains("line 2") && err.contains("input.messages"),
            "{err}"
        );
    }

    #[test]
    fn missing_dataset_file_says_which_flag_to_fix() {
        let a = args(&["--dataset-path", "/nonexistent/sg.json"]);
        let err = sample(&a, &WordCodec).expect_err("missing").to_string();
        assert!(
            err.contains("/nonexistent/sg.json") && err.contains("--dataset-path"),
            "{err}"
        );
    }
}
