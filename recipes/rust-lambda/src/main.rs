//! A Lambda function written as for AWS Lambda with the `lambda_runtime`
//! crate: it echoes the event with its request id and a per-environment
//! count. The runtime speaks the Runtime API that guest-init serves.
use std::sync::atomic::{AtomicU64, Ordering};

use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::{Value, json};

/// Events this environment has handled.
static COUNT: AtomicU64 = AtomicU64::new(0);

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    let (payload, context) = event.into_parts();
    if payload.get("fail").is_some() {
        return Err("asked to fail".into());
    }
    let count = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    Ok(json!({
        "echo": payload,
        "request_id": context.request_id,
        "function": context.env_config.function_name,
        "count": count,
    }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
