//! `api.send.{email, sms, notify}` (also `require('send')`, alias `cxSend`): each send is
//! queued (at most `max_in_flight` at once), runs as its own task so it completes even when the
//! script does not wait, and is retried with exponential backoff. It resolves with
//! `{ok: true, attempts, ...}` or, after the last attempt, `{ok: false, error, attempts}`.
//!
//! `api.send.sip({to, body})` goes through a [`SipMessenger`] the SIP layer attaches with
//! [`SendService::attach_sip`]; until one is attached it rejects with a clear `SendError`.

use std::{
    future::Future,
    sync::{Arc, OnceLock},
    time::Duration,
};

use futures::future::BoxFuture;

use serde_json::{json, Map, Value as Json};
use tokio::sync::{oneshot, Semaphore};

use super::{args, smtp::SmtpSender, template::Templates, webhook::Webhook, ModuleError};
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

/// What `api.send.sip` needs from the SIP stack: send a SIP MESSAGE (RFC 3428) to `to` and
/// report the final response's status code, or why no final response came.
pub trait SipMessenger: Send + Sync {
    fn message(
        &self,
        to: String,
        body: String,
        content_type: String,
    ) -> BoxFuture<'static, Result<u16, String>>;
}

/// The configured channels and the queue they share.
pub struct SendService {
    sip: OnceLock<Arc<dyn SipMessenger>>,
    smtp: Option<Arc<SmtpSender>>,
    sms: Option<Arc<Webhook>>,
    notify: Option<Arc<Webhook>>,
    policy: RetryPolicy,
    queue: Arc<Semaphore>,
    /// Renders `{template, vars}` params (cxSend's ConnexCS form).
    templates: Option<Arc<Templates>>,
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
            sip: OnceLock::new(),
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
            templates: None,
        })
    }

    /// Let `email`/`sms` params name a template (`{to, template, vars}`).
    pub fn with_templates(mut self, templates: Arc<Templates>) -> Self {
        self.templates = Some(templates);
        self
    }

    /// Give `api.send.sip` its way out; false when one was already attached.
    pub fn attach_sip(&self, messenger: Arc<dyn SipMessenger>) -> bool {
        self.sip.set(messenger).is_ok()
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

    /// Answer `api.send.<channel>(params)`; also ConnexCS's `sms(number, text)`, and
    /// `{template, vars}` params, rendered first (explicit `subject`/`text`/`html` win).
    pub fn call(self: &Arc<Self>, channel: &str, mut args: Vec<Json>) -> HostCall {
        let method = format!("api.send.{channel}");
        if channel == "sms" && matches!(args.first(), Some(Json::String(_) | Json::Number(_))) {
            let to = args.remove(0);
            let text = args.first().cloned().unwrap_or(Json::Null);
            args = vec![json!({"to": to, "text": text})];
        }
        let mut params: Map<String, Json> = match args::object(&method, &args, 0, false) {
            Ok(p) => p,
            Err(e) => return HostCall::Ready(Err(e)),
        };
        let templated = matches!(channel, "email" | "sms") && params.contains_key("template");
        if let (true, Some(templates)) = (templated, self.templates.clone()) {
            let name = params.remove("template").unwrap_or_default();
            let Json::String(name) = name else {
                return HostCall::Ready(Err(HostError::type_error(format!(
                    "{method}: template must be a template name"
                ))));
            };
            let vars = params.remove("vars").unwrap_or_else(|| json!({}));
            let me = self.clone();
            let channel = channel.to_string();
            return HostCall::Pending(Box::pin(async move {
                let rendered = templates
                    .render(name, vars)
                    .await
                    .map_err(super::template::template_error)?;
                let mut fill = |key: &str, value: String| {
                    if !params.contains_key(key) && !value.is_empty() {
                        params.insert(key.into(), Json::String(value));
                    }
                };
                if channel == "email" {
                    fill("subject", rendered.subject);
                    fill("text", rendered.text);
                    fill("html", rendered.html);
                } else {
                    let text = if rendered.sms.is_empty() {
                        rendered.text
                    } else {
                        rendered.sms
                    };
                    fill("text", text);
                }
                match me.call(&channel, vec![Json::Object(params)]) {
                    HostCall::Ready(r) => r,
                    HostCall::Pending(f) => f.await,
                }
            }));
        }
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
            "sip" => {
                let Some(sip) = self.sip.get().cloned() else {
                    return HostCall::Ready(Err(send_error(
                        "api.send.sip is not available: no SIP user agent is attached to the send module",
                    )));
                };
                let to = match params.get("to").and_then(Json::as_str) {
                    Some(to) if to.starts_with("sip:") || to.starts_with("sips:") => to.to_string(),
                    _ => {
                        return HostCall::Ready(Err(HostError::type_error(format!(
                            "{method}: to must be a sip: or sips: URI"
                        ))))
                    }
                };
                let body = match params.get("body") {
                    Some(Json::String(b)) => b.clone(),
                    None | Some(Json::Null) => String::new(),
                    Some(other) => other.to_string(),
                };
                let content_type = params
                    .get("contentType")
                    .and_then(Json::as_str)
                    .unwrap_or("text/plain")
                    .to_string();
                self.queue(move || {
                    let fut = sip.message(to.clone(), body.clone(), content_type.clone());
                    async move { sip_attempt(fut.await) }
                })
            }
            other => HostCall::Ready(Err(HostError::type_error(format!(
                "api.send.{other} does not exist"
            )))),
        }
    }
}

/// 2xx is done; 408, 480 and 5xx are worth retrying; other final answers are fatal.
fn sip_attempt(answer: Result<u16, String>) -> Attempt {
    match answer {
        Ok(code @ 200..=299) => Attempt::Done(json!({"status": code})),
        Ok(code @ (408 | 480 | 500..=599)) => {
            Attempt::Retry(format!("SIP MESSAGE answered {code}"))
        }
        Ok(code) => Attempt::Fatal(format!("SIP MESSAGE answered {code}")),
        Err(e) => Attempt::Retry(format!("SIP MESSAGE: {e}")),
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

    /// A messenger standing in for the SIP layer: answers from a script of status codes.
    struct Answers(
        std::sync::Mutex<Vec<Result<u16, String>>>,
        std::sync::Mutex<Vec<(String, String, String)>>,
    );
    impl SipMessenger for Answers {
        fn message(
            &self,
            to: String,
            body: String,
            ct: String,
        ) -> BoxFuture<'static, Result<u16, String>> {
            self.1.lock().unwrap().push((to, body, ct));
            let next = self.0.lock().unwrap().remove(0);
            Box::pin(async move { next })
        }
    }

    async fn settle(call: HostCall) -> Result<Json, HostError> {
        match call {
            HostCall::Ready(r) => r,
            HostCall::Pending(f) => f.await,
        }
    }

    #[tokio::test]
    async fn sip_messages_go_through_the_attached_messenger_with_retries() {
        let config = SendConfig {
            backoff_ms: 1,
            ..SendConfig::default()
        };
        let service = Arc::new(SendService::new(&config).unwrap());
        let e = settle(service.call("sip", vec![json!({"to": "sip:a@b", "body": "hi"})]))
            .await
            .unwrap_err();
        assert!(e.message.contains("no SIP user agent"), "{e}");
        let answers = Arc::new(Answers(
            std::sync::Mutex::new(vec![Err("timeout".into()), Ok(503), Ok(202), Ok(404)]),
            Default::default(),
        ));
        assert!(service.attach_sip(answers.clone()));
        let ok = settle(service.call("sip", vec![json!({"to": "sip:a@b", "body": "hi"})]))
            .await
            .unwrap();
        assert_eq!(ok, json!({"ok": true, "attempts": 3, "status": 202}));
        let fatal = settle(service.call(
            "sip",
            vec![json!({"to": "sip:a@b", "body": {"x": 1}, "contentType": "application/json"})],
        ))
        .await
        .unwrap();
        assert_eq!(
            fatal,
            json!({"ok": false, "attempts": 1, "error": "SIP MESSAGE answered 404"})
        );
        let sent = answers.1.lock().unwrap().clone();
        assert_eq!(
            sent[0],
            ("sip:a@b".into(), "hi".into(), "text/plain".into())
        );
        assert_eq!(
            sent[3],
            (
                "sip:a@b".into(),
                r#"{"x":1}"#.into(),
                "application/json".into()
            )
        );
        let e = settle(service.call("sip", vec![json!({"to": "tel:+44"})]))
            .await
            .unwrap_err();
        assert_eq!(e.name, "TypeError");
    }

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
