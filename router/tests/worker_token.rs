//! The router's calls to workers carry the worker token: a worker that requires the job
//! secret admits a pool built with it and refuses (so never admits) one built without it or
//! with another.

use std::time::Duration;

use llmapi_router::pool::{HealthPolicy, Pool};
use llmapi_router::testing::{Script, ScriptedWorker};

const SECRET: &str = "job-secret-0123456789abcdef0123";

fn policy() -> HealthPolicy {
    HealthPolicy {
        timeout: Duration::from_secs(2),
        ..HealthPolicy::default()
    }
}

async fn admitted_with(token: Option<&str>) -> bool {
    let worker = ScriptedWorker::new(Script {
        required_token: Some(SECRET.into()),
        ..Script::default()
    })
    .spawn()
    .await
    .expect("bind loopback");
    let pool = Pool::new(token).expect("a printable token");
    let w = pool.add(&worker.url()).expect("valid url");
    pool.check_all(&policy()).await;
    let healthy = w.is_healthy();
    worker.kill();
    healthy
}

#[tokio::test]
async fn workers_admit_only_a_pool_that_sends_the_job_secret() {
    assert!(admitted_with(Some(SECRET)).await, "the job secret is sent");
    assert!(!admitted_with(None).await, "no token: refused");
    assert!(
        !admitted_with(Some("job-secret-0123456789abcdef0124")).await,
        "another token: refused"
    );
}

#[tokio::test]
async fn a_generate_without_the_secret_is_unauthenticated() {
    let worker = ScriptedWorker::new(Script {
        required_token: Some(SECRET.into()),
        ..Script::default()
    })
    .spawn()
    .await
    .expect("bind loopback");
    let pool = Pool::new(None).expect("no token");
    let w = pool.add(&worker.url()).expect("valid url");
    let err = w
        .client()
        .generate(llmapi_proto::v1::GenerateRequest::default())
        .await
        .map(|_| ())
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert!(
        worker.worker.requests().is_empty(),
        "nothing reached the worker"
    );
    worker.kill();
}
