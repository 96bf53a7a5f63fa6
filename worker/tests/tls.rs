//! The worker gRPC service over mutual TLS with a job CA (`llmapi_proto::tls`): a client of
//! the job's CA is served; a plaintext client, a client of another job's CA and a client
//! without a certificate never reach the service, even holding the job secret.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::net::SocketAddr;
use std::path::Path;

use llmapi_proto::auth::{AttachToken, RequireToken};
use llmapi_proto::tls::{JOB_SERVER_NAME, JobCa, TransportTls};
use llmapi_proto::v1::worker_client::WorkerClient;
use llmapi_proto::v1::{GenerateRequest, HealthRequest, LoadRequest, StoppingParams};
use llmapi_worker::engine::Engine;
use llmapi_worker::service::{WorkerService, serve};
use support::{Client, SECRET, golden_config};
use tonic::transport::Endpoint;

/// Serves the golden engine over mutual TLS with the job CA of [`SECRET`].
async fn serve_tls() -> SocketAddr {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llama");
    let engine = Engine::start(&dir, golden_config()).unwrap();
    let tls = JobCa::derive(SECRET.as_bytes())
        .unwrap()
        .transport(&["127.0.0.1".into()])
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        WorkerService::new(engine, 1, 1),
        listener,
        RequireToken::new(SECRET).unwrap(),
        Some(tls.grpc_server().unwrap()),
        std::future::pending(),
    ));
    addr
}

/// A client holding the job secret, over `https://` with `tls`, or plain `http://` with none.
async fn client(addr: SocketAddr, tls: Option<&TransportTls>) -> Result<Client, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap();
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.grpc_client().unwrap()).unwrap();
    }
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    Ok(WorkerClient::with_interceptor(
        channel,
        AttachToken::new(Some(SECRET)).unwrap(),
    ))
}

/// Whether a Health call with the job secret succeeds over `tls`.
async fn served(addr: SocketAddr, tls: Option<&TransportTls>) -> Result<(), String> {
    let mut c = client(addr, tls).await?;
    c.health(HealthRequest { probe: false })
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_worker_serves_its_jobs_certificates_and_refuses_every_other_client() {
    let addr = serve_tls().await;
    let job = JobCa::derive(SECRET.as_bytes())
        .unwrap()
        .transport(&[])
        .unwrap();

    // A member of the job: a real generation over mutual TLS.
    let mut member = client(addr, Some(&job)).await.unwrap();
    let mut stream = member
        .generate(GenerateRequest {
            request_id: "member".into(),
            prompt_token_ids: vec![5, 6, 7],
            stopping: Some(StoppingParams {
                max_tokens: 3,
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut tokens = 0;
    while let Some(r) = stream.message().await.unwrap() {
        tokens += r.token_ids.len();
    }
    assert_eq!(tokens, 3, "the member's generation ran to its length");

    // Plain HTTP/2 to a TLS port: no gRPC answer at all.
    let plain = served(addr, None).await;
    assert!(plain.is_err(), "a plaintext client was served");

    // A client of another job's CA, with the right secret: the worker refuses its
    // certificate (and the client refuses the worker's).
    let stranger = JobCa::derive(b"another job's secret 0123456789")
        .unwrap()
        .transport(&[])
        .unwrap();
    let e = served(addr, Some(&stranger)).await.unwrap_err();
    assert!(
        !e.contains("Unauthenticated"),
        "refused by TLS, not the token: {e}"
    );

    // A client that trusts the job's CA but presents no certificate: mutual TLS refuses it.
    let no_cert = TransportTls::new(
        None,
        Some(
            JobCa::derive(SECRET.as_bytes())
                .unwrap()
                .cert_pem()
                .to_owned(),
        ),
        Some(JOB_SERVER_NAME.to_owned()),
    );
    let e = served(addr, Some(&no_cert)).await.unwrap_err();
    assert!(
        !e.contains("Unauthenticated"),
        "refused by TLS, not the token: {e}"
    );

    // None of the refused clients reached the engine.
    let load = member
        .load(LoadRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(load.running + load.queued, 0);
    served(addr, Some(&job)).await.unwrap();
}
