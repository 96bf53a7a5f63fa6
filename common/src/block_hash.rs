//! Chained hashes of full KV-cache blocks: the one definition the engine's block manager and the
//! router's `kv_cache_aware` policy share.
//!
//! A prompt is cut into blocks of `tokens_per_block` tokens; only full blocks are hashed. The
//! hash of block `i` covers its own tokens and the hash of block `i - 1`, so equal hashes mean
//! equal prefixes (up to 64-bit collisions). The function is fixed here, independent of the Rust
//! version and of process-random seeds, so a router and a worker built separately agree.

/// The parent hash used for the first block of every sequence.
pub const ROOT_BLOCK_HASH: u64 = 0x6c6c_6d61_7069_6b76; // "llmapikv"

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Hash of one full block given the hash of the block before it (`ROOT_BLOCK_HASH` for the first).
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = FNV_OFFSET;
    for byte in parent.to_le_bytes() {
        h = (h ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
    }
    for token in tokens {
        for byte in token.to_le_bytes() {
            h = (h ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
        }
    }
    finalize(h)
}

/// Hashes of every full block of `tokens`, in order; a trailing partial block is not hashed.
///
/// Returns an empty list when `tokens_per_block` is 0.
pub fn prefix_block_hashes(tokens: &[u32], tokens_per_block: usize) -> Vec<u64> {
    if tokens_per_block == 0 {
        return Vec::new();
    }
    let mut parent = ROOT_BLOCK_HASH;
    tokens
        .chunks_exact(tokens_per_block)
        .map(|block| {
            parent = block_hash(parent, block);
            parent
        })
        .collect()
}

/// The splitmix64 finalizer: spreads FNV's weak low bits over the whole word.
fn finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
    fn the_hash_is_a_fixed_function() {
        // Pinned so that a router and a worker built apart always agree.
        assert_eq!(
            block_hash(ROOT_BLOCK_HASH, &[1, 2, 3]),
            0xca74_0063_c6b9_5a76
        );
        assert_ne!(
            block_hash(ROOT_BLOCK_HASH, &[1, 2, 3]),
            block_hash(ROOT_BLOCK_HASH, &[3, 2, 1])
        );
        assert_ne!(block_hash(1, &[1, 2, 3]), block_hash(2, &[1, 2, 3]));
    }
}
