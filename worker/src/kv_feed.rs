//! The KvEvents stream: the engine's KV event log (`kv::KvEventLog`) as proto batches, one
//! reader per call.
//!
//! A call starts where its caller left off (run id and last event id) or, when that position
//! is unknown here, with a snapshot sent in parts. Then it forwards events in order as the
//! engine appends them. The stream holds a small channel: a slow reader holds up its own call
//! only, and one that falls further behind than the log keeps gets a fresh snapshot. The
//! stream ends when the server starts shutting down (`closing`), so that a graceful shutdown
//! does not wait on subscribers.

use std::pin::Pin;

use futures::Stream;
use llmapi_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::engine::EngineHandle;
use crate::kv::{BlockHash, KvEventData, KvEventRead};

/// Most events per batch.
pub const MAX_EVENTS_PER_BATCH: usize = 256;
/// Most block hashes per snapshot part (32 bytes each: 2 MiB a part).
pub const SNAPSHOT_PART_BLOCKS: usize = 1 << 16;
/// Batches queued for a slow reader before the feed waits for it.
const QUEUED_BATCHES: usize = 4;

/// The stream a KvEvents call answers with.
pub type KvEventStream = Pin<Box<dyn Stream<Item = Result<pb::KvEventBatch, Status>> + Send>>;

/// Starts a feed for a caller at (`run_id`, `after`); it ends when the caller hangs up or
/// `closing` turns true.
pub fn kv_event_stream(
    engine: EngineHandle,
    run_id: String,
    after: u64,
    closing: Option<watch::Receiver<bool>>,
) -> KvEventStream {
    let (tx, rx) = mpsc::channel(QUEUED_BATCHES);
    tokio::spawn(feed(engine, tx, run_id, after, closing));
    Box::pin(ReceiverStream::new(rx))
}

async fn feed(
    engine: EngineHandle,
    tx: mpsc::Sender<Result<pb::KvEventBatch, Status>>,
    mut run_id: String,
    mut after: u64,
    mut closing: Option<watch::Receiver<bool>>,
) {
    let tokens_per_block = engine.info().tokens_per_block;
    let mut changed = engine.kv_event_watch();
    // The first batch always goes out, even empty: it tells the caller the run id.
    let mut first = true;
    loop {
        changed.mark_unchanged();
        let (run, read) = engine.kv_events(&run_id, after, MAX_EVENTS_PER_BATCH);
        let (batches, last) = match read {
            KvEventRead::Snapshot {
                last_event_id,
                blocks,
            } => {
                let hashes: Vec<BlockHash> = blocks.iter().map(|b| b.hash).collect();
                (snapshot_parts(&run, last_event_id, &hashes), last_event_id)
            }
            KvEventRead::Events(events) => {
                let last = events.last().map_or(after, |e| e.id);
                let batch = pb::KvEventBatch {
                    run_id: run.clone(),
                    snapshot: None,
                    events: events
                        .into_iter()
                        .map(|e| pb::KvEvent {
                            event_id: e.id,
                            data: Some(to_proto(e.data, tokens_per_block)),
                        })
                        .collect(),
                };
                let send = first || !batch.events.is_empty();
                (if send { vec![batch] } else { Vec::new() }, last)
            }
        };
        first = false;
        let full = batches.len() == 1
            && batches[0].snapshot.is_none()
            && batches[0].events.len() == MAX_EVENTS_PER_BATCH;
        for batch in batches {
            if tx.send(Ok(batch)).await.is_err() {
                return;
            }
        }
        run_id = run;
        after = last;
        if full {
            // More events may be waiting already.
            continue;
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            () = tx.closed() => return,
            () = server_closing(&mut closing) => return,
        }
    }
}

/// Resolves once the server starts closing, or its signal is gone with the server; never
/// without a signal (a service not run by `service::serve`).
async fn server_closing(closing: &mut Option<watch::Receiver<bool>>) {
    match closing {
        Some(rx) => {
            let _ = rx.wait_for(|c| *c).await;
        }
        None => std::future::pending().await,
    }
}

fn snapshot_parts(run_id: &str, event_id: u64, hashes: &[BlockHash]) -> Vec<pb::KvEventBatch> {
    let chunks: Vec<&[BlockHash]> = if hashes.is_empty() {
        vec![&[]]
    } else {
        hashes.chunks(SNAPSHOT_PART_BLOCKS).collect()
    };
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| pb::KvEventBatch {
            run_id: run_id.to_owned(),
            snapshot: Some(pb::KvSnapshot {
                event_id,
                block_hashes: chunk.iter().map(|h| h.as_bytes().to_vec()).collect(),
                last_part: i + 1 == n,
            }),
            events: Vec::new(),
        })
        .collect()
}

fn to_proto(data: KvEventData, tokens_per_block: u32) -> pb::kv_event::Data {
    use pb::kv_event::Data;
    let wire = |hashes: &[BlockHash]| hashes.iter().map(|h| h.as_bytes().to_vec()).collect();
    match data {
        KvEventData::Stored { parent, blocks } => Data::Stored(pb::KvBlocksStored {
            parent_hash: parent.map(|p| p.as_bytes().to_vec()).unwrap_or_default(),
            block_hashes: wire(&blocks),
            tokens_per_block,
        }),
        KvEventData::Removed(hashes) => Data::Removed(pb::KvBlocksRemoved {
            block_hashes: wire(&hashes),
        }),
        KvEventData::AllCleared => Data::AllCleared(pb::KvAllCleared {}),
    }
}
