//! The host side of a CUDA step: validating a batch and laying out every integer its kernels
//! read (token ids, positions, KV slots, each row's sequence and context length, the block
//! tables, and the rows whose logits are wanted) as one array, uploaded in one copy.
//!
//! Decode steps replayed as CUDA graphs are padded here to the graph's rows, with the block
//! tables at the graph's fixed stride, so the graph finds every integer where it was
//! captured. Not here: any device call.

use crate::backend::{BackendError, LogitsWanted, SeqChunk};

/// What the KV pool and model allow a step to reference.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Blocks in the KV pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub tokens_per_block: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

/// A step's integers, in the order the kernels' pointers address them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepLayout {
    /// Every integer, one after the other (see `offsets`).
    pub meta: Vec<i32>,
    /// Where in `meta` the token ids, positions, KV slots, row sequences, row context
    /// lengths, block tables and picked rows start.
    pub offsets: [usize; 7],
    /// (chunk, row) of each row whose logits are wanted, in row order.
    pub picked: Vec<(usize, i32)>,
    /// Rows of the step (padded rows included).
    pub rows: usize,
    /// Block-table stride.
    pub max_blocks: usize,
}

/// A size as a kernel `int`.
fn int(v: usize, what: &str) -> Result<i32, BackendError> {
    i32::try_from(v).map_err(|_| BackendError::InvalidStep(format!("{what} {v} exceeds 2^31")))
}

impl StepLayout {
    /// Validates `batch` against `lim` and lays it out. With `graph` = Some((rows, stride))
    /// (a decode step the caller checked fits: one token per chunk, rows >= chunks, tables
    /// within stride), rows past the batch are padding: token 0 at position 0, KV slot -1
    /// (the store skips it), attending to one position through its own zero table row.
    pub fn new(
        batch: &[SeqChunk<'_>],
        lim: Limits,
        graph: Option<(usize, usize)>,
    ) -> Result<Self, BackendError> {
        let (num_blocks, tpb, vocab) = (lim.num_blocks, lim.tokens_per_block, lim.vocab);
        if tpb == 0 {
            return Err(BackendError::InvalidStep("tokens_per_block is 0".into()));
        }
        let mut tokens: Vec<i32> = Vec::new();
        let mut positions: Vec<i32> = Vec::new();
        let mut slots: Vec<i32> = Vec::new();
        let mut row_seq: Vec<i32> = Vec::new();
        let mut row_ctx: Vec<i32> = Vec::new();
        let mut picked: Vec<(usize, i32)> = Vec::new();
        let mut max_blocks = 1usize;
        for (i, ch) in batch.iter().enumerate() {
            let end = ch.start_pos + ch.tokens.len();
            let needed = end.div_ceil(tpb);
            if ch.block_table.len() < needed {
                return Err(BackendError::InvalidStep(format!(
                    "chunk {i} reaches position {end} but has {} blocks",
                    ch.block_table.len()
                )));
            }
            if let Some(&b) = ch.block_table[..needed]
                .iter()
                .find(|&&b| b as usize >= num_blocks)
            {
                return Err(BackendError::InvalidStep(format!(
                    "chunk {i} uses block {b} but the KV pool has {num_blocks} blocks"
                )));
            }
            if let Some(&t) = ch.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(BackendError::InvalidStep(format!(
                    "token id {t} is outside the vocabulary of {vocab} tokens"
                )));
            }
            max_blocks = max_blocks.max(needed);
            for (j, &t) in ch.tokens.iter().enumerate() {
                let pos = ch.start_pos + j;
                let slot = ch.block_table[pos / tpb] as usize * tpb + pos % tpb;
                let row = int(tokens.len(), "row")?;
                let wanted = match ch.logits {
                    LogitsWanted::All => true,
                    LogitsWanted::Last => pos + 1 == end,
                    LogitsWanted::None => false,
                };
                if wanted {
                    picked.push((i, row));
                }
                tokens.push(t as i32);
                positions.push(int(pos, "position")?);
                slots.push(int(slot, "KV slot")?);
                row_seq.push(int(i, "chunk")?);
                row_ctx.push(int(pos + 1, "context length")?);
            }
        }
        if let Some((rows, stride)) = graph {
            if rows < tokens.len() || stride < max_blocks {
                return Err(BackendError::InvalidStep(format!(
                    "a graph of {rows} rows and {stride} blocks per sequence cannot hold {} rows using up to {max_blocks} blocks",
                    tokens.len()
                )));
            }
            for r in tokens.len()..rows {
                tokens.push(0);
                positions.push(0);
                slots.push(-1);
                row_seq.push(int(r, "row")?);
                row_ctx.push(1);
            }
            max_blocks = stride;
        }
        let rows = tokens.len();
        // One table row per chunk; a graph step also one per padded row (the attention
        // kernel reads row_seq's table row).
        let table_rows = if graph.is_some() { rows } else { batch.len() };
        let mut tables = vec![0i32; table_rows * max_blocks];
        for (i, ch) in batch.iter().enumerate() {
            let needed = (ch.start_pos + ch.tokens.len()).div_ceil(tpb);
            for (dst, &b) in tables[i * max_blocks..]
                .iter_mut()
                .zip(&ch.block_table[..needed])
            {
                *dst = b as i32;
            }
        }
        let picked_rows: Vec<i32> = picked.iter().map(|p| p.1).collect();
        let mut meta = Vec::with_capacity(5 * rows + tables.len() + picked.len());
        let mut offsets = [0usize; 7];
        for (k, part) in [
            &tokens,
            &positions,
            &slots,
            &row_seq,
            &row_ctx,
            &tables,
            &picked_rows,
        ]
        .into_iter()
        .enumerate()
        {
            offsets[k] = meta.len();
            meta.extend_from_slice(part);
        }
        Ok(Self {
            meta,
            offsets,
            picked,
            rows,
            max_blocks,
        })
    }

    /// The `k`-th part of `meta` (0 tokens, 1 positions, 2 slots, 3 row sequences, 4 context
    /// lengths, 5 tables, 6 picked rows).
    pub fn part(&self, k: usize) -> &[i32] {
        let end = self.offsets.get(k + 1).copied().unwrap_or(self.meta.len());
        &self.meta[self.offsets[k]..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: Limits = Limits {
        num_blocks: 16,
        tokens_per_block: 4,
        vocab: 100,
    };

    fn chunk<'a>(
        tokens: &'a [u32],
        start: usize,
        table: &'a [u32],
        l: LogitsWanted,
    ) -> SeqChunk<'a> {
        SeqChunk {
            tokens,
            start_pos: start,
            block_table: table,
            logits: l,
        }
    }

    #[test]
    fn a_prefill_and_a_decode_lay_out_rows_slots_and_tables() {
        let (t0, t1) = ([7, 8, 9, 10, 11], [3]);
        let (b0, b1) = ([5, 2], [9, 4, 6]);
        let l = StepLayout::new(
            &[
                chunk(&t0, 0, &b0, LogitsWanted::All),
                chunk(&t1, 9, &b1, LogitsWanted::Last),
            ],
            LIM,
            None,
        )
        .unwrap();
        assert_eq!(l.rows, 6);
        assert_eq!(l.part(0), &[7, 8, 9, 10, 11, 3]);
        assert_eq!(l.part(1), &[0, 1, 2, 3, 4, 9]);
        // Position 4 of chunk 0 is block 2's first slot; position 9 of chunk 1 is block 6's
        // second.
        assert_eq!(l.part(2), &[20, 21, 22, 23, 8, 25]);
        assert_eq!(l.part(3), &[0, 0, 0, 0, 0, 1]);
        assert_eq!(l.part(4), &[1, 2, 3, 4, 5, 10]);
        assert_eq!(l.max_blocks, 3);
        assert_eq!(l.part(5), &[5, 2, 0, 9, 4, 6]);
        assert_eq!(l.part(6), &[0, 1, 2, 3, 4, 5]);
        assert_eq!(l.picked.first(), Some(&(0, 0)));
        assert_eq!(l.picked.last(), Some(&(1, 5)));
    }

    #[test]
    fn only_wanted_rows_are_picked() {
        let t = [1, 2, 3];
        let b = [0];
        let l = StepLayout::new(
            &[
                chunk(&t, 0, &b, LogitsWanted::None),
                chunk(&t, 0, &b, LogitsWanted::Last),
            ],
            LIM,
            None,
        )
        .unwrap();
        assert_eq!(l.picked, vec![(1, 5)]);
    }

    #[test]
    fn graph_steps_pad_rows_and_use_the_fixed_stride() {
        let (a, b) = ([4], [5]);
        let (ta, tb) = ([1, 2], [3]);
        let l = StepLayout::new(
            &[
                chunk(&a, 5, &ta, LogitsWanted::Last),
                chunk(&b, 0, &tb, LogitsWanted::Last),
            ],
            LIM,
            Some((4, 8)),
        )
        .unwrap();
        assert_eq!(l.rows, 4);
        assert_eq!(l.max_blocks, 8);
        assert_eq!(l.part(0), &[4, 5, 0, 0]);
        assert_eq!(l.part(2), &[9, 12, -1, -1], "padded rows skip the KV store");
        assert_eq!(
            l.part(3),
            &[0, 1, 2, 3],
            "each padded row has its own table row"
        );
        assert_eq!(l.part(4), &[6, 1, 1, 1]);
        let tables = l.part(5);
        assert_eq!(tables.len(), 4 * 8);
        assert_eq!(&tables[..3], &[1, 2, 0]);
        assert_eq!(&tables[8..10], &[3, 0]);
        assert!(tables[16..].iter().all(|&b| b == 0));
        assert_eq!(l.picked, vec![(0, 0), (1, 1)], "padding is never picked");
        // The fixed part's offsets depend only on the graph's rows and stride.
        assert_eq!(l.offsets[..6], [0, 4, 8, 12, 16, 20]);
    }

    #[test]
    fn a_graph_that_cannot_hold_the_step_is_an_error() {
        let t = [1];
        let b = [0, 1, 2];
        let long = chunk(&t, 9, &b, LogitsWanted::Last);
        assert!(StepLayout::new(&[long], LIM, Some((1, 2))).is_err());
        let one = chunk(&t, 0, &b, LogitsWanted::Last);
        assert!(StepLayout::new(&[one, one], LIM, Some((1, 4))).is_err());
    }

    #[test]
    fn references_outside_the_pool_or_vocabulary_are_refused() {
        let e = |batch: &[SeqChunk<'_>]| StepLayout::new(batch, LIM, None).unwrap_err().to_string();
        let t = [1, 2, 3, 4, 5];
        let msg = e(&[chunk(&t, 0, &[0], LogitsWanted::Last)]);
        assert!(msg.contains("reaches position 5 but has 1 blocks"), "{msg}");
        let msg = e(&[chunk(&t[..1], 0, &[16], LogitsWanted::Last)]);
        assert!(
            msg.contains("block 16 but the KV pool has 16 blocks"),
            "{msg}"
        );
        let msg = e(&[chunk(&[100], 0, &[0], LogitsWanted::Last)]);
        assert!(
            msg.contains("token id 100 is outside the vocabulary of 100"),
            "{msg}"
        );
        let none = StepLayout::new(&[], LIM, None).unwrap();
        assert_eq!(none.rows, 0);
    }
}
