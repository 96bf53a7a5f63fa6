//! Trains the built-in checkpoints' byte-level BPE tokenizer on text that ships with
//! llmapi, topped up with deterministic pseudo-words so that larger vocabularies fill up.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// The shipped training text.
const CORPUS: &str = include_str!("corpus.txt");

/// Beginning of text; added by the post-processor when special tokens are requested.
pub const BOS: &str = "<|begin_of_text|>";
/// End of text.
pub const END_OF_TEXT: &str = "<|end_of_text|>";
/// End of a chat turn; the chat template's EOS.
pub const EOT: &str = "<|eot_id|>";
/// Special tokens, in id order right after the byte alphabet.
pub const SPECIAL_TOKENS: &[&str] = &[
    BOS,
    END_OF_TEXT,
    "<|start_header_id|>",
    "<|end_header_id|>",
    EOT,
];

/// Trains a tokenizer with at most `vocab_size` tokens. Deterministic for a given size.
pub fn train(vocab_size: usize) -> Result<Tokenizer, String> {
    let mut lines: Vec<String> = CORPUS.lines().map(str::to_owned).collect();
    // Roughly 60 bytes of pseudo-text per wanted token gives enough frequent pairs to fill the
    // vocabulary with merges seen at least twice.
    lines.extend(pseudo_text(vocab_size * 60, 0x11a7));

    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .build();
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    let mut wrapper = TrainerWrapper::BpeTrainer(std::mem::take(&mut trainer));
    tok.train(&mut wrapper, lines.into_iter())
        .map_err(|e| format!("tokenizer training failed: {e}"))?;
    let bos_id = tok
        .token_to_id(BOS)
        .ok_or("tokenizer training lost the BOS token")?;
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .and_then(|b| b.try_pair(format!("{BOS} $A {BOS} $B")))
        .map_err(|e| format!("post-processor: {e}"))?
        .special_tokens(vec![(BOS.to_owned(), bos_id)])
        .build()
        .map_err(|e| format!("post-processor: {e}"))?;
    tok.with_post_processor(Some(post));
    Ok(tok)
}

/// Deterministic pseudo-words drawn with a Zipf-like law from a syllable lexicon, so that
/// frequent "words" and syllables become merges as real words do.
fn pseudo_text(bytes: usize, seed: u64) -> Vec<String> {
    const ONSETS: &[&str] = &[
        "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "ch",
        "sh", "th", "st", "tr", "pl", "br", "",
    ];
    const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "ai", "ou", "ea", "io"];
    const CODAS: &[&str] = &["", "", "n", "r", "s", "l", "t", "nd", "st"];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let lexicon: Vec<String> = (0..40_000)
        .map(|_| {
            let syllables = 1 + rng.random_range(0..4);
            (0..syllables)
                .map(|_| {
                    let o = ONSETS[rng.random_range(0..ONSETS.len())];
                    let v = VOWELS[rng.random_range(0..VOWELS.len())];
                    let c = CODAS[rng.random_range(0..CODAS.len())];
                    format!("{o}{v}{c}")
                })
                .collect()
        })
        .collect();
    // Zipf weights 1 / (rank + 2.7), as a cumulative table for inverse sampling.
    let mut cdf = Vec::with_capacity(lexicon.len());
    let mut acc = 0.0f64;
    for rank in 0..lexicon.len() {
        acc += 1.0 / (rank as f64 + 2.7);
        cdf.push(acc);
    }
    let mut out = Vec::new();
    let mut produced = 0;
    while produced < bytes {
        let words = 6 + rng.random_range(0..12);
        let mut line = String::new();
        for i in 0..words {
            let x = rng.random::<f64>() * acc;
            let idx = cdf.partition_point(|&c| c < x).min(lexicon.len() - 1);
            if i > 0 {
                line.push(' ');
            }
            let w = &lexicon[idx];
            if i == 0 {
                let mut chars = w.chars();
                if let Some(f) = chars.next() {
                    line.extend(f.to_uppercase());
                    line.push_str(chars.as_str());
                }
            } else {
                line.push_str(w);
            }
            if rng.random_range(0..20) == 0 {
                line.push(',');
            }
        }
        line.push(if rng.random_range(0..5) == 0 {
            '?'
        } else {
            '.'
        });
        produced += line.len();
        out.push(line);
    }
    out
}
