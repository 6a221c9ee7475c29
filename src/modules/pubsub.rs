//! `require('cxPubSub')` (alias `pubsub`): `publish(event, [id,] payload)` and
//! `subscribe(event, [id,] callback)`. In one engine the bus is in-process; with
//! `[kv] backend = "redis://..."` it is Redis pub/sub, so scripts on several engines see each
//! other's events. Payloads are JSON (at most 64 KiB); nothing else crosses between runs.
//!
//! A subscription lives as long as the run that made it: its callback runs for each event
//! until the run ends or `unsubscribe()` is called. An `id` narrows a subscription to events
//! published with that id; no id (or `'*'`) receives every id.

use std::{cell::RefCell, collections::HashMap, rc::Rc, sync::Arc, time::Duration};

use futures::StreamExt;
use serde_json::{json, Value as Json};
use tokio::sync::{broadcast, Notify, OnceCell};

use super::{args, ModuleError};
use crate::script::{HostCall, HostError, HostMethod, HostModule, HostObject};

/// Largest payload, as JSON text.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Subscriptions one run may hold at once (each holds a receiver outside the JS heap).
pub const MAX_SUBSCRIPTIONS: usize = 100;
/// Events a slow subscriber may fall behind by before it misses some.
const BACKLOG: usize = 1024;
const REDIS_PREFIX: &str = "callforge:pubsub:";
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// One published event.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub id: Option<String>,
    pub payload: Json,
}

/// Where events go: this process, or Redis (which echoes them back to this process too).
pub struct PubSub {
    local: broadcast::Sender<Arc<Event>>,
    redis: Option<RedisBus>,
}

struct RedisBus {
    client: redis::Client,
    url: String,
    publisher: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    /// Set once the listener task has subscribed.
    listening: OnceCell<()>,
}

fn pubsub_error(message: impl Into<String>) -> HostError {
    HostError::new("PubSubError", format!("cxPubSub: {}", message.into()))
}

impl PubSub {
    /// In-process when `redis_url` is `None`.
    pub fn new(redis_url: Option<&str>) -> Result<Self, ModuleError> {
        let (local, _) = broadcast::channel(BACKLOG);
        let redis = redis_url
            .map(|url| {
                redis::Client::open(url)
                    .map(|client| RedisBus {
                        client,
                        url: url.to_string(),
                        publisher: Default::default(),
                        listening: OnceCell::new(),
                    })
                    .map_err(|e| ModuleError::config("kv", format!("backend: {e}")))
            })
            .transpose()?;
        Ok(PubSub { local, redis })
    }

    /// Deliver `event` to every subscriber (on every engine sharing the Redis).
    pub async fn publish(self: &Arc<Self>, event: Event) -> Result<(), String> {
        let Some(redis) = &self.redis else {
            // No subscribers is not an error.
            let _ = self.local.send(Arc::new(event));
            return Ok(());
        };
        let message = json!({"id": event.id, "payload": event.payload}).to_string();
        let channel = format!("{REDIS_PREFIX}{}", event.name);
        let mut slot = redis.publisher.lock().await;
        if slot.is_none() {
            let conn = tokio::time::timeout(
                REDIS_TIMEOUT,
                redis.client.get_multiplexed_async_connection(),
            )
            .await
            .map_err(|_| format!("{}: connection timed out", redis.url))?
            .map_err(|e| format!("{}: {e}", redis.url))?;
            *slot = Some(conn);
        }
        let Some(conn) = slot.as_mut() else {
            return Err(format!("{}: not connected", redis.url));
        };
        let sent: Result<i64, _> = tokio::time::timeout(
            REDIS_TIMEOUT,
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(&message)
                .query_async(conn),
        )
        .await
        .map_err(|_| format!("{}: PUBLISH timed out", redis.url))?;
        if let Err(e) = sent {
            // A broken connection is made again on the next publish.
            *slot = None;
            return Err(format!("{}: {e}", redis.url));
        }
        Ok(())
    }

    /// A receiver of every event from now on; with Redis, the listener is started first.
    pub fn receiver(&self) -> broadcast::Receiver<Arc<Event>> {
        self.local.subscribe()
    }

    /// Resolves once events published anywhere reach this process's receivers.
    pub async fn ready(self: &Arc<Self>) -> Result<(), String> {
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let me = self.clone();
        redis
            .listening
            .get_or_try_init(|| async move { me.listen().await })
            .await
            .map(|_| ())
    }

    /// Subscribe to every callforge channel and forward what arrives to the local receivers,
    /// reconnecting after a failure for as long as the process lives.
    async fn listen(self: Arc<Self>) -> Result<(), String> {
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let connect = |client: redis::Client, url: String| async move {
            let mut pubsub = tokio::time::timeout(REDIS_TIMEOUT, client.get_async_pubsub())
                .await
                .map_err(|_| format!("{url}: connection timed out"))?
                .map_err(|e| format!("{url}: {e}"))?;
            pubsub
                .psubscribe(format!("{REDIS_PREFIX}*"))
                .await
                .map_err(|e| format!("{url}: PSUBSCRIBE: {e}"))?;
            Ok::<_, String>(pubsub)
        };
        let first = connect(redis.client.clone(), redis.url.clone()).await?;
        let local = self.local.clone();
        let (client, url) = (redis.client.clone(), redis.url.clone());
        tokio::spawn(async move {
            let mut pubsub = Some(first);
            let mut down = false;
            loop {
                let current = match pubsub.take() {
                    Some(p) => p,
                    None => match connect(client.clone(), url.clone()).await {
                        Ok(p) => {
                            if std::mem::take(&mut down) {
                                tracing::info!("cxPubSub: subscribed to {url} again");
                            }
                            p
                        }
                        Err(e) => {
                            // Once per outage; retried every second.
                            if !std::mem::replace(&mut down, true) {
                                tracing::warn!("cxPubSub: {e}; retrying every second");
                            }
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    },
                };
                let mut messages = current.into_on_message();
                while let Some(msg) = messages.next().await {
                    let Some(name) = msg.get_channel_name().strip_prefix(REDIS_PREFIX) else {
                        continue;
                    };
                    let Ok(body) = serde_json::from_slice::<Json>(msg.get_payload_bytes()) else {
                        tracing::warn!("cxPubSub: a message on {name} is not JSON; dropped");
                        continue;
                    };
                    let _ = local.send(Arc::new(Event {
                        name: name.to_string(),
                        id: body.get("id").and_then(Json::as_str).map(str::to_string),
                        payload: body.get("payload").cloned().unwrap_or(Json::Null),
                    }));
                }
                tracing::warn!("cxPubSub: the Redis subscription to {url} ended; reconnecting");
            }
        });
        Ok(())
    }
}

/// One run's subscription.
struct Subscription {
    event: String,
    id: Option<String>,
    rx: Rc<tokio::sync::Mutex<broadcast::Receiver<Arc<Event>>>>,
    closed: Rc<Notify>,
}

impl Subscription {
    fn wants(&self, e: &Event) -> bool {
        e.name == self.event
            && match self.id.as_deref() {
                None | Some("*") => true,
                Some(id) => e.id.as_deref() == Some(id),
            }
    }
}

/// `subscribe`'s overloads and the callback loop are JS; the host side is `raw.subscribe`,
/// `raw.next` (the next event of a subscription, `null` once it is closed), `raw.unsubscribe`
/// and `raw.publish`.
const PRELUDE: &str = r#"(function (raw) {
  function subscribe(event, id, callback) {
    if (typeof id === "function" && callback === undefined) { callback = id; id = null; }
    if (typeof callback !== "function") {
      return Promise.reject(new TypeError("cxPubSub.subscribe(event, [id,] callback): callback must be a function"));
    }
    return raw.subscribe(event, id === undefined ? null : id).then((sub) => {
      (async () => {
        for (;;) {
          const msg = await raw.next(sub);
          if (msg === null) return;
          try {
            await callback(msg.payload, msg);
          } catch (e) {
            console.error("cxPubSub: a subscriber of '" + event + "' threw: " + (e && e.message ? e.message : String(e)));
          }
        }
      })();
      return { event: event, id: id, unsubscribe: () => raw.unsubscribe(sub) };
    });
  }
  function publish(event, id, payload) {
    if (arguments.length < 3) { payload = id; id = null; }
    return raw.publish(event, id === undefined ? null : id, payload === undefined ? null : payload);
  }
  return { publish, subscribe };
})"#;

const METHODS: &[HostMethod] = &[
    HostMethod::asynchronous("publish"),
    HostMethod::asynchronous("subscribe"),
    HostMethod::asynchronous("next"),
    HostMethod::sync("unsubscribe"),
];

/// `require('cxPubSub')`.
pub struct PubSubModule {
    bus: Arc<PubSub>,
}

impl PubSubModule {
    pub fn new(bus: Arc<PubSub>) -> Self {
        PubSubModule { bus }
    }
}

impl HostModule for PubSubModule {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(PubSubObject {
            bus: self.bus.clone(),
            subs: Default::default(),
            next_id: Default::default(),
        })
    }
    fn prelude(&self) -> Option<&'static str> {
        Some(PRELUDE)
    }
}

struct PubSubObject {
    bus: Arc<PubSub>,
    subs: Rc<RefCell<HashMap<u64, Subscription>>>,
    next_id: std::cell::Cell<u64>,
}

/// An optional id argument: a string or number, `null`/`undefined` for none.
fn opt_id(method: &str, args: &[Json], index: usize) -> Result<Option<String>, HostError> {
    args::opt_string(method, args, index, "id")
}

impl HostObject for PubSubObject {
    fn methods(&self) -> &[HostMethod] {
        METHODS
    }

    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        let name = format!("cxPubSub.{method}");
        match method {
            "publish" => {
                let event = match args::string(&name, &args, 0, "event") {
                    Ok(e) => e,
                    Err(e) => return HostCall::Ready(Err(e)),
                };
                let id = match opt_id(&name, &args, 1) {
                    Ok(i) => i,
                    Err(e) => return HostCall::Ready(Err(e)),
                };
                let payload = args.get(2).cloned().unwrap_or(Json::Null);
                let size = payload.to_string().len();
                if size > MAX_PAYLOAD_BYTES {
                    return HostCall::Ready(Err(HostError::type_error(format!(
                        "{name}: the payload is {size} bytes of JSON; at most {MAX_PAYLOAD_BYTES}"
                    ))));
                }
                let bus = self.bus.clone();
                HostCall::Pending(Box::pin(async move {
                    bus.publish(Event {
                        name: event,
                        id,
                        payload,
                    })
                    .await
                    .map(|()| Json::Bool(true))
                    .map_err(pubsub_error)
                }))
            }
            "subscribe" => {
                let event = match args::string(&name, &args, 0, "event") {
                    Ok(e) => e,
                    Err(e) => return HostCall::Ready(Err(e)),
                };
                let id = match opt_id(&name, &args, 1) {
                    Ok(i) => i,
                    Err(e) => return HostCall::Ready(Err(e)),
                };
                if self.subs.borrow().len() >= MAX_SUBSCRIPTIONS {
                    return HostCall::Ready(Err(HostError::type_error(format!(
                        "{name}: a run may hold at most {MAX_SUBSCRIPTIONS} subscriptions"
                    ))));
                }
                // The receiver exists from this call on: a publish right after `subscribe()`
                // (without awaiting it) is not missed.
                let sub_id = self.next_id.get() + 1;
                self.next_id.set(sub_id);
                self.subs.borrow_mut().insert(
                    sub_id,
                    Subscription {
                        event,
                        id,
                        rx: Rc::new(tokio::sync::Mutex::new(self.bus.receiver())),
                        closed: Rc::new(Notify::new()),
                    },
                );
                let bus = self.bus.clone();
                HostCall::Pending(Box::pin(async move {
                    bus.ready().await.map_err(pubsub_error)?;
                    Ok(json!(sub_id))
                }))
            }
            "next" => {
                let sub_id = args.first().and_then(Json::as_u64).unwrap_or(0);
                let subs = self.subs.clone();
                let (rx, closed) = match subs.borrow().get(&sub_id) {
                    Some(s) => (s.rx.clone(), s.closed.clone()),
                    None => return HostCall::Ready(Ok(Json::Null)),
                };
                HostCall::Pending(Box::pin(async move {
                    let mut rx = rx.lock().await;
                    loop {
                        let received = tokio::select! {
                            r = rx.recv() => r,
                            () = closed.notified() => return Ok(Json::Null),
                        };
                        match received {
                            Ok(event) => {
                                let wanted = subs.borrow().get(&sub_id).map(|s| s.wants(&event));
                                match wanted {
                                    None => return Ok(Json::Null),
                                    Some(false) => continue,
                                    Some(true) => {
                                        return Ok(json!({
                                            "event": event.name,
                                            "id": event.id,
                                            "payload": event.payload,
                                        }))
                                    }
                                }
                            }
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                tracing::warn!("cxPubSub: a slow subscriber missed {n} events");
                            }
                            Err(broadcast::error::RecvError::Closed) => return Ok(Json::Null),
                        }
                    }
                }))
            }
            "unsubscribe" => {
                let sub_id = args.first().and_then(Json::as_u64).unwrap_or(0);
                let removed = self.subs.borrow_mut().remove(&sub_id);
                if let Some(sub) = &removed {
                    sub.closed.notify_one();
                }
                HostCall::Ready(Ok(Json::Bool(removed.is_some())))
            }
            other => HostCall::Ready(Err(HostError::type_error(format!(
                "cxPubSub has no method '{other}'"
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prelude_compiles() {
        crate::script::compile("prelude", PRELUDE).unwrap();
    }

    #[test]
    fn ids_narrow_subscriptions() {
        let (tx, _) = broadcast::channel(1);
        let sub = |id: Option<&str>| Subscription {
            event: "e".into(),
            id: id.map(str::to_string),
            rx: Rc::new(tokio::sync::Mutex::new(tx.subscribe())),
            closed: Rc::new(Notify::new()),
        };
        let ev = |name: &str, id: Option<&str>| Event {
            name: name.into(),
            id: id.map(str::to_string),
            payload: Json::Null,
        };
        assert!(sub(None).wants(&ev("e", Some("1"))));
        assert!(sub(Some("*")).wants(&ev("e", None)));
        assert!(sub(Some("1")).wants(&ev("e", Some("1"))));
        assert!(!sub(Some("1")).wants(&ev("e", Some("2"))));
        assert!(!sub(Some("1")).wants(&ev("e", None)));
        assert!(!sub(None).wants(&ev("f", None)));
    }
}
