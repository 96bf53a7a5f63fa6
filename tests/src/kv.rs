//! A router's KV index of a worker against the worker's own block list: what the
//! KV-aware routing tests compare.

use std::collections::BTreeSet;
use std::time::Duration;

use llmapi_proto::auth::AttachToken;
use llmapi_proto::tls::JobCa;
use llmapi_proto::v1::KvEventsRequest;
use llmapi_proto::v1::worker_client::WorkerClient;

use crate::{get, wait_until};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The run id and cached blocks of the worker at `url` (its gRPC URL; `https://` for a job's
/// worker, reached with the job CA), from a KvEvents snapshot asked for with the job secret
/// `secret` (10 s at most).
pub fn worker_blocks(url: &str, secret: &str) -> (String, BTreeSet<String>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned()).expect("url");
        if url.starts_with("https://") {
            // A job's worker: TLS with the CA every holder of the job secret derives.
            let tls = JobCa::derive(secret.as_bytes())
                .and_then(|ca| ca.transport(&[]))
                .and_then(|t| t.grpc_client())
                .expect("the job CA's client settings");
            endpoint = endpoint.tls_config(tls).expect("TLS settings");
        }
        let channel = endpoint
            .connect()
            .await
            .expect("the worker's gRPC port answers");
        let token = AttachToken::new(Some(secret)).expect("a valid secret");
        let mut client = WorkerClient::with_interceptor(channel, token)
            .max_decoding_message_size(llmapi_proto::limits::MAX_MESSAGE_BYTES);
        let mut stream = client
            .kv_events(KvEventsRequest::default())
            .await
            .expect("KvEvents with the job secret")
            .into_inner();
        let mut blocks = BTreeSet::new();
        loop {
            let batch = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("a snapshot part within 10 s")
                .expect("the stream stays open")
                .expect("a batch");
            let part = batch
                .snapshot
                .expect("a caller from no run gets a snapshot");
            blocks.extend(part.block_hashes.iter().map(|h| hex(h)));
            if part.last_part {
                return (batch.run_id, blocks);
            }
        }
    })
}

/// The run id, sync state and blocks the router on `router` holds for the worker at `url`
/// (`GET /workers/kv_index`).
pub fn router_index(router: u16, url: &str) -> (String, bool, BTreeSet<String>) {
    let view = get(router, "/workers/kv_index").json();
    let w = view["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["url"] == url).cloned())
        .unwrap_or_default();
    let blocks = w["blocks"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter_map(|h| h.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (
        w["run_id"].as_str().unwrap_or_default().to_owned(),
        w["synced"].as_bool().unwrap_or(false),
        blocks,
    )
}

/// Waits (20 s at most) until the router's index of the worker at `url` equals the worker's
/// own list, run id included; panics with both otherwise. Returns the blocks.
pub fn assert_agree(router: u16, url: &str, secret: &str, when: &str) -> BTreeSet<String> {
    let mut last = None;
    let agreed = wait_until(Duration::from_secs(20), || {
        let (run, blocks) = worker_blocks(url, secret);
        let (r_run, synced, r_blocks) = router_index(router, url);
        let same = synced && run == r_run && blocks == r_blocks;
        last = Some((run, blocks, r_run, synced, r_blocks));
        same
    });
    let (run, blocks, r_run, synced, r_blocks) = last.expect("checked at least once");
    assert!(
        agreed,
        "{when}: worker {url} (run {run}) holds {} blocks, router {router} (run {r_run}, synced \
         {synced}) believes {}; only the worker: {:?}; only the router: {:?}",
        blocks.len(),
        r_blocks.len(),
        blocks.difference(&r_blocks).collect::<Vec<_>>(),
        r_blocks.difference(&blocks).collect::<Vec<_>>()
    );
    blocks
}
