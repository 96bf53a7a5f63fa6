//! Chained hashes of full KV-cache blocks: the one definition the engine's block manager and the
//! router's `kv_cache_aware` policy share.
//!
//! A prompt is cut into blocks of `tokens_per_block` tokens; only full blocks are hashed. The
//! hash of block `i` is SHA-256 over the hash of block `i - 1` (32 bytes) followed by the
//! block's token ids (4 bytes each, little-endian), so equal hashes mean equal prefixes. The
//! engine reuses a cached block on a hash match without comparing tokens, which is sound only
//! because nobody can construct two prefixes with one hash: a 64-bit non-cryptographic hash
//! (the FNV-1a used before) lets a client who controls prompts search a collision and have one
//! tenant's KV answer another's prompt (the class of vLLM's CVE-2025-25183). The full 256 bits
//! are kept. The function is fixed here, independent of the Rust version and of process-random
//! seeds, so a router and a worker built separately agree.

use sha2::{Digest, Sha256};

/// The chained hash of one full KV block (SHA-256, all 32 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash([u8; 32]);

/// The parent hash used for the first block of every sequence. Not the SHA-256 of anything
/// known, so no block's hash can stand in for it.
pub const ROOT_BLOCK_HASH: BlockHash = BlockHash(*b"llmapi kv block root, sha256 v1.");

impl BlockHash {
    /// Width of a hash on the wire (the KvEvents RPC's block hashes).
    pub const LEN: usize = 32;

    /// The hash as bytes, for the wire.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Reads a hash from the wire; None unless `bytes` has exactly `BlockHash::LEN` bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The first 8 bytes identify a block in logs; the rest adds nothing a reader can use.
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("..")
    }
}

/// Hash of one full block given the hash of the block before it (`ROOT_BLOCK_HASH` for the first).
pub fn block_hash(parent: &BlockHash, tokens: &[u32]) -> BlockHash {
    let mut hasher = Sha256::new();
    hasher.update(parent.0);
    // Feed tokens through a stack buffer: one update per 64 tokens, not one per token.
    let mut buf = [0u8; 256];
    for chunk in tokens.chunks(buf.len() / 4) {
        for (dst, token) in buf.chunks_exact_mut(4).zip(chunk) {
            dst.copy_from_slice(&token.to_le_bytes());
        }
        hasher.update(&buf[..chunk.len() * 4]);
    }
    BlockHash(hasher.finalize().into())
}

/// Hashes of every full block of `tokens`, in order; a trailing partial block is not hashed.
///
/// Returns an empty list when `tokens_per_block` is 0.
pub fn prefix_block_hashes(tokens: &[u32], tokens_per_block: usize) -> Vec<BlockHash> {
    if tokens_per_block == 0 {
        return Vec::new();
    }
    let mut parent = ROOT_BLOCK_HASH;
    tokens
        .chunks_exact(tokens_per_block)
        .map(|block| {
            parent = block_hash(&parent, block);
            parent
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_full_blocks_are_hashed() {
        let tokens: Vec<u32> = (0..70).collect();
        assert_eq!(prefix_block_hashes(&tokens, 32).len(), 2);
        assert!(prefix_block_hashes(&tokens, 0).is_empty());
    }

    #[test]
    fn equal_prefixes_give_equal_hashes_and_a_change_propagates() {
        let a: Vec<u32> = (0..96).collect();
        let mut b = a.clone();
        b[40] = 9999;
        let ha = prefix_block_hashes(&a, 32);
        let hb = prefix_block_hashes(&b, 32);
        assert_eq!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1]);
        assert_ne!(ha[2], hb[2], "a changed block changes every later hash");
    }

    #[test]
    fn the_hash_is_sha256_of_the_parent_and_the_tokens() {
        // Pinned so that a router and a worker built apart always agree; the value is
        // `hashlib.sha256(b"llmapi kv block root, sha256 v1." + struct.pack("<3I", 1, 2, 3))`.
        let h = block_hash(&ROOT_BLOCK_HASH, &[1, 2, 3]);
        assert_eq!(h.as_bytes(), &hex32(PINNED_1_2_3));
        assert_eq!(format!("{h:?}"), format!("{}..", &PINNED_1_2_3[..16]));
        assert_ne!(h, block_hash(&ROOT_BLOCK_HASH, &[3, 2, 1]));
        let other_parent = block_hash(&ROOT_BLOCK_HASH, &[0]);
        assert_ne!(
            h,
            block_hash(&other_parent, &[1, 2, 3]),
            "the parent counts"
        );
        // More tokens than the stack buffer holds: every one of them counts.
        let long: Vec<u32> = (0..200).collect();
        let mut changed = long.clone();
        changed[199] = 7;
        assert_ne!(
            block_hash(&ROOT_BLOCK_HASH, &long),
            block_hash(&ROOT_BLOCK_HASH, &changed)
        );
        assert_eq!(BlockHash::from_slice(h.as_bytes()), Some(h));
        assert_eq!(BlockHash::from_slice(&h.as_bytes()[..16]), None);
    }

    const PINNED_1_2_3: &str = "e7dd89e713b9b5a6c978088a860ec663a3a38b09d8a0876777f7310587b4de95";

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    /// The 64-bit FNV-1a block hash used before (splitmix64-finalized, chained over the
    /// parent's 8 bytes), kept here to show what the SHA-256 hash protects against.
    fn fnv_block_hash(parent: u64, tokens: &[u32]) -> u64 {
        const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h = FNV_OFFSET;
        for byte in parent
            .to_le_bytes()
            .into_iter()
            .chain(tokens.iter().flat_map(|t| t.to_le_bytes()))
        {
            h = (h ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
        }
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^ (h >> 31)
    }

    /// The old root parent.
    const FNV_ROOT: u64 = 0x6c6c_6d61_7069_6b76;

    /// Two 8-token blocks with one old hash (under `FNV_ROOT`); worker/tests/engine.rs has
    /// the same pair.
    const FNV_COLLISION: ([u32; 8], [u32; 8]) = (
        [241, 9, 250, 248, 145, 180, 143, 42],
        [46, 74, 167, 138, 252, 124, 224, 19],
    );

    /// Two 32-token first blocks whose old FNV-1a hashes collide: eight chosen tokens (each
    /// below 256, valid ids for any vocabulary) followed by the same 24. Found with a
    /// distinguished-point (Pollard rho) search over the 64-bit FNV state: 4.6e9 hash
    /// evaluations, under two minutes on one core. Any client could do the same.
    fn fnv_colliding_blocks() -> (Vec<u32>, Vec<u32>) {
        let tail: Vec<u32> = (100..124).collect();
        let a = FNV_COLLISION.0.into_iter().chain(tail.clone());
        let b = FNV_COLLISION.1.into_iter().chain(tail);
        (a.collect(), b.collect())
    }

    #[test]
    fn prompts_that_collide_under_the_old_64_bit_hash_get_different_hashes() {
        let (a, b) = fnv_colliding_blocks();
        assert_ne!(a, b);
        assert_eq!(
            fnv_block_hash(FNV_ROOT, &a),
            fnv_block_hash(FNV_ROOT, &b),
            "the pinned pair is an FNV-1a collision"
        );
        assert_ne!(
            prefix_block_hashes(&a, 32),
            prefix_block_hashes(&b, 32),
            "SHA-256 tells the blocks apart"
        );
    }
}
