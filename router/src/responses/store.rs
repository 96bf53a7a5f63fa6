//! The stored responses of one router: each response object with the conversation that led to
//! it, for `previous_response_id` and `GET /v1/responses/{id}`. Bounded by count and by bytes,
//! the least recently used leaving first; held in memory, so per router and lost on restart.

use std::sync::{Mutex, MutexGuard};

use indexmap::IndexMap;
use serde_json::Value;

use super::request::Turn;

/// Default `--responses_store_max`.
pub const DEFAULT_MAX_RESPONSES: usize = 1024;
/// Default `--responses_store_max_bytes`: 64 MiB.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

/// How much the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Most responses kept (0: none are stored).
    pub max_responses: usize,
    /// Most bytes of text and JSON kept.
    pub max_bytes: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_responses: DEFAULT_MAX_RESPONSES,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

/// One stored response.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The response object as it was answered.
    pub response: Value,
    /// The conversation up to and including its output (instructions excluded: they do not
    /// carry over to a follow-up, as with OpenAI).
    pub turns: Vec<Turn>,
}

impl Stored {
    fn bytes(&self) -> usize {
        let turns: usize = self.turns.iter().map(|t| t.role.len() + t.text.len()).sum();
        turns + self.response.to_string().len()
    }
}

struct Entry {
    stored: Stored,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    /// Least recently used first.
    entries: IndexMap<String, Entry>,
    bytes: usize,
}

/// An LRU store of responses by id.
pub struct ResponseStore {
    limits: StoreLimits,
    inner: Mutex<Inner>,
}

impl ResponseStore {
    /// An empty store holding at most `limits`.
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            limits,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The map is consistent between statements: a panicking holder leaves it usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `stored` under `id` as the most recent, evicting the least recently used past
    /// the limits; false when it alone is over the byte limit (it is then not kept).
    pub fn insert(&self, id: String, stored: Stored) -> bool {
        let bytes = stored.bytes();
        if bytes > self.limits.max_bytes || self.limits.max_responses == 0 {
            return false;
        }
        let mut inner = self.lock();
        if let Some(old) = inner.entries.shift_remove(&id) {
            inner.bytes -= old.bytes;
        }
        while inner.entries.len() >= self.limits.max_responses
            || inner.bytes + bytes > self.limits.max_bytes
        {
            match inner.entries.shift_remove_index(0) {
                Some((_, old)) => inner.bytes -= old.bytes,
                None => break,
            }
        }
        inner.bytes += bytes;
        inner.entries.insert(id, Entry { stored, bytes });
        true
    }

    /// The response stored under `id`, now the most recently used.
    pub fn get(&self, id: &str) -> Option<Stored> {
        let mut inner = self.lock();
        let i = inner.entries.get_index_of(id)?;
        let last = inner.entries.len() - 1;
        inner.entries.move_index(i, last);
        inner.entries.get_index(last).map(|(_, e)| e.stored.clone())
    }

    /// Removes the response stored under `id`; false when there was none.
    pub fn remove(&self, id: &str) -> bool {
        let mut inner = self.lock();
        match inner.entries.shift_remove(id) {
            Some(old) => {
                inner.bytes -= old.bytes;
                true
            }
            None => false,
        }
    }

    /// Responses stored.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether none is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(text: &str) -> Stored {
        Stored {
            response: Value::Null,
            turns: vec![Turn {
                role: "user".into(),
                text: text.into(),
            }],
        }
    }

    #[test]
    fn the_least_recently_used_leaves_first() {
        let store = ResponseStore::new(StoreLimits {
            max_responses: 2,
            max_bytes: 1 << 20,
        });
        store.insert("a".into(), stored("1"));
        store.insert("b".into(), stored("2"));
        assert!(store.get("a").is_some());
        store.insert("c".into(), stored("3"));
        assert!(store.get("b").is_none(), "b was the least recently used");
        assert!(store.get("a").is_some() && store.get("c").is_some());
    }

    #[test]
    fn the_byte_bound_evicts_and_refuses_what_cannot_fit() {
        // Each entry: "user" + its text + "null".
        let store = ResponseStore::new(StoreLimits {
            max_responses: 100,
            max_bytes: 2 * (4 + 10 + 4),
        });
        assert!(store.insert("a".into(), stored("0123456789")));
        assert!(store.insert("b".into(), stored("0123456789")));
        assert!(store.insert("c".into(), stored("0123456789")));
        assert_eq!(store.len(), 2);
        assert!(store.get("a").is_none());
        assert!(!store.insert("big".into(), stored(&"x".repeat(100))));
        assert!(store.remove("b") && !store.remove("b"));
    }
}
