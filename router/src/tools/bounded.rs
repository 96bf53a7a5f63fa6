//! Reading `tools` from a body without buffering an unbounded tree: the JSON values are
//! counted as they are built, and a list past `MAX_TOOLS` tools or `MAX_TOOL_VALUES` values
//! is refused while it is read (a 32 MiB body of `[1,1,...]` would otherwise cost some
//! 500 MB of `serde_json::Value`s before any check ran).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Most tools one request may list (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;
/// Most JSON values (objects, lists, strings, numbers, ...) all tools may hold together.
pub const MAX_TOOL_VALUES: usize = 100_000;

/// `tools`: null or a list of JSON values, held to the caps.
pub struct ToolsSeed;

impl<'de> DeserializeSeed<'de> for ToolsSeed {
    type Value = Option<Vec<Value>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ToolsSeed {
    type Value = Option<Vec<Value>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of tools")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut budget = MAX_TOOL_VALUES;
        let mut tools = Vec::new();
        while let Some(tool) = seq.next_element_seed(Counted {
            budget: &mut budget,
        })? {
            if tools.len() == MAX_TOOLS {
                return Err(de::Error::custom(format!(
                    "tools lists more than {MAX_TOOLS} tools; send at most {MAX_TOOLS}"
                )));
            }
            tools.push(tool);
        }
        Ok(Some(tools))
    }
}

/// One JSON value, each node taken from `budget`.
struct Counted<'a> {
    budget: &'a mut usize,
}

impl Counted<'_> {
    fn take<E: de::Error>(&mut self) -> Result<(), E> {
        *self.budget = self.budget.checked_sub(1).ok_or_else(|| {
            E::custom(format!(
                "tools hold more than {MAX_TOOL_VALUES} JSON values; send smaller parameter schemas"
            ))
        })?;
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Counted<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counted<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: de::Error>(mut self) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(mut self, v: bool) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(mut self, v: i64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(mut self, v: u64) -> Result<Value, E> {
        self.take()?;
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(mut self, v: f64) -> Result<Value, E> {
        self.take()?;
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(mut self, v: &str) -> Result<Value, E> {
        self.take()?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(mut self, v: String) -> Result<Value, E> {
        self.take()?;
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(Counted {
            budget: &mut *self.budget,
        })? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Value, A::Error> {
        self.take()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let v = map.next_value_seed(Counted {
                budget: &mut *self.budget,
            })?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<Option<Vec<Value>>, String> {
        let mut de = serde_json::Deserializer::from_str(json);
        ToolsSeed.deserialize(&mut de).map_err(|e| e.to_string())
    }

    #[test]
    fn tools_are_read_as_json_values() {
        let tools = read(r#"[{"type": "function", "function": {"name": "f", "parameters": {"a": [1, 2.5, null, true]}}}]"#)
            .unwrap()
            .unwrap();
        assert_eq!(tools[0]["function"]["parameters"]["a"][1], 2.5);
        assert_eq!(read("null").unwrap(), None);
        assert!(read(r#""f""#).is_err());
    }

    #[test]
    fn too_many_tools_or_values_are_refused_while_read() {
        let many = format!("[{}]", vec!["{}"; MAX_TOOLS + 1].join(","));
        assert!(read(&many).unwrap_err().contains("more than 128 tools"));
        let huge = format!("[[{}]]", vec!["1"; MAX_TOOL_VALUES].join(","));
        assert!(read(&huge).unwrap_err().contains("JSON values"));
    }
}
