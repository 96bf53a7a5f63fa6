//! The `logit_bias` field of both endpoints: an object of token ids (JSON string keys) to
//! biases in [-100, 100], at most `MAX_LOGIT_BIAS` entries, as OpenAI and vLLM take it.
//!
//! The object is read without keeping more than one entry past the cap (a 32 MiB body could
//! hold a million), then checked into the worker's map with a 400 naming `logit_bias` and
//! the entry at fault. The vocabulary check waits for the model's size (`check_vocab`).
//! Not for: applying the bias (the worker's sampler).

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::ApiError;
use llmapi_proto::limits::{MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_VALUE};

const PARAM: &str = "logit_bias";

/// Longest key kept for an error message, in bytes.
const SHOWN_KEY_BYTES: usize = 32;

/// `logit_bias` as the body held it: its first entries (one past the cap at most) and how
/// many it had.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogitBias {
    /// Key (cut to `SHOWN_KEY_BYTES`) and value, None when the value is not a number.
    entries: Vec<(String, Option<f64>)>,
    /// Entries in the body.
    len: usize,
}

impl LogitBias {
    /// The worker's map, or a 400 for more than `MAX_LOGIT_BIAS` entries, a key that is not
    /// a token id, or a value that is not a number in [-100, 100].
    pub fn validate(&self) -> Result<HashMap<u32, f32>, ApiError> {
        if self.len > MAX_LOGIT_BIAS {
            return Err(ApiError::invalid(
                PARAM,
                format!(
                    "logit_bias has {} entries; at most {MAX_LOGIT_BIAS} are accepted",
                    self.len
                ),
            ));
        }
        let limit = f64::from(MAX_LOGIT_BIAS_VALUE);
        let mut out = HashMap::with_capacity(self.entries.len());
        for (key, value) in &self.entries {
            let id: u32 = key.parse().map_err(|_| {
                ApiError::invalid(
                    PARAM,
                    format!("logit_bias key {key:?} is not a token id; use token ids such as \"50256\" as keys"),
                )
            })?;
            let bias = match value {
                Some(v) if (-limit..=limit).contains(v) => *v as f32,
                Some(v) => {
                    return Err(ApiError::invalid(
                        PARAM,
                        format!(
                            "logit_bias of token {id} is {v}; biases must be between -{limit} and {limit}"
                        ),
                    ));
                }
                None => {
                    return Err(ApiError::invalid(
                        PARAM,
                        format!(
                            "logit_bias of token {id} is not a number; use a number between -{limit} and {limit}"
                        ),
                    ));
                }
            };
            out.insert(id, bias);
        }
        Ok(out)
    }
}

/// 400 when a biased token id is outside a vocabulary of `vocab_size` tokens (0: unknown,
/// left to the worker's own check).
pub fn check_vocab(bias: &HashMap<u32, f32>, vocab_size: u32) -> Result<(), ApiError> {
    match bias
        .keys()
        .filter(|&&t| vocab_size > 0 && t >= vocab_size)
        .min()
    {
        Some(t) => Err(ApiError::invalid(
            PARAM,
            format!("logit_bias names token {t}, outside the vocabulary (size {vocab_size})"),
        )),
        None => Ok(()),
    }
}

impl<'de> serde::Deserialize<'de> for LogitBias {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(BiasVisitor)
    }
}

struct BiasVisitor;

impl<'de> Visitor<'de> for BiasVisitor {
    type Value = LogitBias;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("logit_bias as an object of token ids to biases")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LogitBias, A::Error> {
        let mut out = LogitBias::default();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value::<BiasValue>()?.0;
            out.len += 1;
            if out.entries.len() <= MAX_LOGIT_BIAS {
                out.entries.push((clipped(&key), value));
            }
        }
        Ok(out)
    }
}

/// A bias as read: the number, or None for any other JSON value (skipped unbuffered).
struct BiasValue(Option<f64>);

impl<'de> serde::Deserialize<'de> for BiasValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BiasValueVisitor)
    }
}

struct BiasValueVisitor;

impl<'de> Visitor<'de> for BiasValueVisitor {
    type Value = BiasValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a bias")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<BiasValue, E> {
        Ok(BiasValue(Some(v as f64)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<BiasValue, E> {
        Ok(BiasValue(Some(v as f64)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<BiasValue, E> {
        Ok(BiasValue(Some(v)))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<BiasValue, E> {
        Ok(BiasValue(None))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<BiasValue, E> {
        Ok(BiasValue(None))
    }

    fn visit_unit<E: de::Error>(self) -> Result<BiasValue, E> {
        Ok(BiasValue(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<BiasValue, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(BiasValue(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BiasValue, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(BiasValue(None))
    }
}

/// `key` cut to `SHOWN_KEY_BYTES` at a character boundary (a valid id is far shorter).
fn clipped(key: &str) -> String {
    let mut end = key.len().min(SHOWN_KEY_BYTES);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    key[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<HashMap<u32, f32>, ApiError> {
        serde_json::from_str::<LogitBias>(json)
            .expect("an object")
            .validate()
    }

    #[test]
    fn ids_and_biases_in_range_are_kept() {
        let m = read(r#"{"5": 100, "7": -100, "9": 0.5}"#).expect("valid");
        assert_eq!(m, HashMap::from([(5, 100.0), (7, -100.0), (9, 0.5)]));
    }

    #[test]
    fn bad_keys_values_and_sizes_name_the_field() {
        let many: Vec<String> = (0..=MAX_LOGIT_BIAS)
            .map(|i| format!("\"{i}\": 1"))
            .collect();
        let many = format!("{{{}}}", many.join(","));
        for (json, says) in [
            (r#"{"a": 1}"#, "not a token id"),
            (r#"{"-1": 1}"#, "not a token id"),
            (r#"{"5": 100.5}"#, "between"),
            (r#"{"5": "1"}"#, "not a number"),
            (r#"{"5": [1]}"#, "not a number"),
            (many.as_str(), "at most 300"),
        ] {
            let e = read(json).expect_err(json);
            assert_eq!(e.param.as_deref(), Some(PARAM));
            assert!(e.message.contains(says), "{json}: {}", e.message);
        }
    }

    #[test]
    fn ids_outside_the_vocabulary_are_refused() {
        let m = read(r#"{"10": 1, "3": 1}"#).expect("valid");
        assert!(check_vocab(&m, 11).is_ok());
        let e = check_vocab(&m, 10).expect_err("10 is past a vocabulary of 10");
        assert!(e.message.contains("token 10"), "{}", e.message);
        assert!(
            check_vocab(&m, 0).is_ok(),
            "unknown size is the worker's to check"
        );
    }
}
