//! `api.send.{email, sms, notify}` (also `require('send')`, alias `cxSend`): each send is
//! queued (at most `max_in_flight` at once), runs as its own task so it completes even when the
//! script does not wait, and is retried with exponential backoff. It resolves with
//! `{ok: true, attempts, ...}` or, after the last attempt, `{ok: false, error, attempts}`.

use std::{future::Future, sync::Arc, time::Duration};

use serde_json::{json, Map, Value as Json};
use tokio::sync::{oneshot, Semaphore};

use super::{args, smtp::SmtpSender, webhook::Webhook, ModuleError};
use crate::{
    config::SendConfig,
    script::{HostCall, HostError, HostMethod, HostModule, HostObject},
};

/// The outcome of one delivery attempt.
pub enum Attempt {
    Done(Json),
    /// Worth another try (network error, timeout, 5xx, SMTP transient error).
    Retry(String),
    /// No retry can help (4xx, SMTP permanent error).
    Fatal(String),
}

/// How sends are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub retries: u32,
    pub backoff: Duration,
}

/// Run `attempt` until it is done, fatal, or out of retries; never fails, never hangs longer
/// than its attempts' own timeouts plus the backoff.
pub async fn with_retries<F, Fut>(policy: RetryPolicy, mut attempt: F) -> Json
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Attempt>,
{
    let mut delay = policy.backoff;
    let total = policy.retries.saturating_add(1);
    let mut n = 0;
    loop {
        n += 1;
        match attempt().await {
            Attempt::Done(info) => {
                let mut out = json!({"ok": true, "attempts": n});
                if let (Some(o), Json::Object(extra)) = (out.as_object_mut(), info) {
                    o.extend(extra);
                }
                return out;
            }
            Attempt::Fatal(error) => return json!({"ok": false, "error": error, "attempts": n}),
            Attempt::Retry(error) if n >= total => {
                return json!({"ok": false, "error": error, "attempts": n})
            }
            Attempt::Retry(error) => {
                tracing::debug!("send attempt {n} failed, retrying in {delay:?}: {error}");
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2).min(Duration::from_secs(60));
            }
        }
    }
}

/// The configured channels and the queue they share.
pub struct SendService {
    smtp: Option<Arc<SmtpSender>>,
    sms: Option<Arc<Webhook>>,
    notify: Option<Arc<Webhook>>,
    policy: RetryPolicy,
    queue: Arc<Semaphore>,
}

fn send_error(message: impl Into<String>) -> HostError {
    HostError::new("SendError", message)
}

impl SendService {
    pub fn new(config: &SendConfig) -> Result<Self, ModuleError> {
        if config.max_in_flight == 0 {
            return Err(ModuleError::config(
                "send",
                "max_in_flight must be at least 1",
            ));
        }
        Ok(SendService {
            smtp: config
                .smtp
                .as_ref()
                .map(SmtpSender::new)
                .transpose()?
                .map(Arc::new),
            sms: config
                .sms
                .as_ref()
                .map(|c| Webhook::new("send.sms", c))
                .transpose()?
                .map(Arc::new),
            notify: config
                .notify
                .as_ref()
                .map(|c| Webhook::new("send.notify", c))
                .transpose()?
                .map(Arc::new),
            policy: RetryPolicy {
                retries: config.retries,
                backoff: Duration::from_millis(config.backoff_ms),
            },
            queue: Arc::new(Semaphore::new(config.max_in_flight)),
        })
    }

    /// Queue a delivery as its own task; the script's promise observes its outcome.
    fn queue<F, Fut>(&self, attempt: F) -> HostCall
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Attempt> + Send,
    {
        let (tx, rx) = oneshot::channel();
        let queue = self.queue.clone();
        let policy = self.policy;
        tokio::spawn(async move {
            let _permit = queue.acquire_owned().await;
            let outcome = with_retries(policy, attempt).await;
            let _ = tx.send(outcome);
        });
        HostCall::Pending(Box::pin(async move {
            Ok(rx.await.unwrap_or_else(
                |_| json!({"ok": false, "error": "the send task ended without an outcome"}),
            ))
        }))
    }

    /// Answer `api.send.<channel>(params)`.
    pub fn call(&self, channel: &str, args: Vec<Json>) -> HostCall {
        let method = format!("api.send.{channel}");
        let params: Map<String, Json> = match args::object(&method, &args, 0, false) {
            Ok(p) => p,
            Err(e) => return HostCall::Ready(Err(e)),
        };
        match channel {
            "email" => {
                let Some(smtp) = self.smtp.clone() else {
                    return not_configured(&method, "send.smtp");
                };
                let message = match smtp.message(&params) {
                    Ok(m) => m,
                    Err(e) => {
                        return HostCall::Ready(Err(HostError::type_error(format!(
                            "{method}: {e}"
                        ))))
                    }
                };
                self.queue(move || {
                    let smtp = smtp.clone();
                    let message = message.clone();
                    async move { smtp.send(message).await }
                })
            }
            "sms" | "notify" => {
                let hook = if channel == "sms" {
                    &self.sms
                } else {
                    &self.notify
                };
                let Some(hook) = hook.clone() else {
                    return not_configured(&method, &format!("send.{channel}"));
                };
                let body = hook.body(&params);
                self.queue(move || {
                    let hook = hook.clone();
                    let body = body.clone();
                    async move { hook.send(&body).await }
                })
            }
            "sip" => HostCall::Ready(Err(send_error(
                "api.send.sip is not available yet: SIP MESSAGE needs the SIP stack's user agent",
            ))),
            other => HostCall::Ready(Err(HostError::type_error(format!(
                "api.send.{other} does not exist"
            )))),
        }
    }
}

fn not_configured(method: &str, key: &str) -> HostCall {
    HostCall::Ready(Err(send_error(format!(
        "{method} is not configured: add a [{key}] section to callforge.toml"
    ))))
}

const METHODS: &[HostMethod] = &[
    HostMethod::asynchronous("email"),
    HostMethod::asynchronous("sms"),
    HostMethod::asynchronous("notify"),
    HostMethod::asynchronous("sip"),
];

/// `require('send')`.
pub struct SendModule {
    service: Arc<SendService>,
}

impl SendModule {
    pub fn new(service: Arc<SendService>) -> Self {
        SendModule { service }
    }
}

impl HostModule for SendModule {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(SendObject {
            service: self.service.clone(),
        })
    }
}

struct SendObject {
    service: Arc<SendService>,
}

impl HostObject for SendObject {
    fn methods(&self) -> &[HostMethod] {
        METHODS
    }
    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        self.service.call(method, args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_and_end_with_ok_false() {
        let policy = RetryPolicy {
            retries: 2,
            backoff: Duration::from_millis(100),
        };
        let count = Arc::new(AtomicU32::new(0));
        let c = count.clone();
        let started = tokio::time::Instant::now();
        let out = with_retries(policy, move || {
            c.fetch_add(1, Ordering::SeqCst);
            async { Attempt::Retry("down".into()) }
        })
        .await;
        assert_eq!(out, json!({"ok": false, "error": "down", "attempts": 3}));
        assert_eq!(count.load(Ordering::SeqCst), 3);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        let out = with_retries(policy, || async { Attempt::Fatal("no".into()) }).await;
        assert_eq!(out["attempts"], 1);
        let c = Arc::new(AtomicU32::new(0));
        let out = with_retries(policy, move || {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Attempt::Retry("once".into())
                } else {
                    Attempt::Done(json!({"status": 200}))
                }
            }
        })
        .await;
        assert_eq!(out, json!({"ok": true, "attempts": 2, "status": 200}));
    }
}
