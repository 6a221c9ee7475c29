//! The Redis KV backend (`[kv] backend = "redis://..."`), for engines that share state.
//!
//! Values are stored as JSON text, so a counter is a plain Redis integer. `incr` is one Lua
//! script: the increment and the expiry of a new counter happen atomically.

use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use serde_json::Value as Json;
use tokio::sync::OnceCell;

use super::{kv::Kv, StoreError};

const INCR_SCRIPT: &str = "local v = redis.call('INCRBY', KEYS[1], ARGV[1]) \
    if tonumber(ARGV[2]) > 0 and redis.call('PTTL', KEYS[1]) < 0 then \
    redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return v";

/// How long to wait for a Redis connection or an answer.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// A Redis-backed KV store; connects on first use and reconnects after a failure.
pub struct RedisKv {
    client: redis::Client,
    url: String,
    conn: std::sync::Arc<tokio::sync::Mutex<std::sync::Arc<OnceCell<MultiplexedConnection>>>>,
}

impl std::fmt::Debug for RedisKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisKv").field("url", &self.url).finish()
    }
}

fn redis_err(e: redis::RedisError) -> StoreError {
    if e.to_string().contains("not an integer") {
        return StoreError::NotInteger(String::new());
    }
    StoreError::Redis(e.to_string())
}

impl RedisKv {
    /// Check the URL now (a bad URL is a startup error); connect later.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        let client =
            redis::Client::open(url).map_err(|e| StoreError::Redis(format!("{url}: {e}")))?;
        Ok(RedisKv {
            client,
            url: url.to_string(),
            conn: Default::default(),
        })
    }

    fn connection(&self) -> BoxFuture<'static, Result<MultiplexedConnection, StoreError>> {
        let client = self.client.clone();
        let slot = self.conn.clone();
        let url = self.url.clone();
        Box::pin(async move {
            let cell = slot.lock().await.clone();
            let conn = cell
                .get_or_try_init(|| async {
                    // redis-rs answers "timed out" after 500 ms by default, which a burst of
                    // a thousand scripts on a loaded machine can exceed; we wait REDIS_TIMEOUT.
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(REDIS_TIMEOUT))
                        .set_response_timeout(Some(REDIS_TIMEOUT));
                    tokio::time::timeout(
                        REDIS_TIMEOUT,
                        client.get_multiplexed_async_connection_with_config(&config),
                    )
                    .await
                    .map_err(|_| StoreError::Redis(format!("cannot connect to {url}: timed out")))?
                    .map_err(|e| StoreError::Redis(format!("cannot connect to {url}: {e}")))
                })
                .await?;
            Ok(conn.clone())
        })
    }

    pub(crate) fn query<T: redis::FromRedisValue + Send + 'static>(
        &self,
        cmd: redis::Cmd,
    ) -> BoxFuture<'static, Result<T, StoreError>> {
        let conn = self.connection();
        let slot = self.conn.clone();
        Box::pin(async move {
            let mut conn = conn.await?;
            let answer = tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async::<T>(&mut conn)).await;
            match answer {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) => {
                    if e.is_io_error() || e.is_connection_dropped() {
                        // Forget the broken connection: the next call reconnects.
                        *slot.lock().await = Default::default();
                    }
                    Err(redis_err(e))
                }
                Err(_) => Err(StoreError::Redis("redis did not answer in time".into())),
            }
        })
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl Kv for RedisKv {
    fn get(&self, key: String) -> BoxFuture<'static, Result<Option<Json>, StoreError>> {
        let fut = self.query::<Option<String>>(redis::cmd("GET").arg(&key).clone());
        Box::pin(async move {
            Ok(fut
                .await?
                .map(|t| serde_json::from_str(&t).unwrap_or(Json::String(t))))
        })
    }

    fn set(
        &self,
        key: String,
        value: Json,
        ttl: Option<Duration>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key).arg(value.to_string());
        if let Some(ttl) = ttl.filter(|d| !d.is_zero()) {
            cmd.arg("PX").arg(millis(ttl).max(1));
        }
        let fut = self.query::<()>(cmd);
        Box::pin(fut)
    }

    fn incr(
        &self,
        key: String,
        by: i64,
        expire: Option<Duration>,
    ) -> BoxFuture<'static, Result<i64, StoreError>> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(INCR_SCRIPT)
            .arg(1)
            .arg(&key)
            .arg(by)
            .arg(expire.map(millis).unwrap_or(0));
        let fut = self.query::<i64>(cmd);
        Box::pin(async move {
            fut.await.map_err(|e| match e {
                StoreError::NotInteger(_) => StoreError::NotInteger(key),
                other => other,
            })
        })
    }

    fn del(&self, key: String) -> BoxFuture<'static, Result<bool, StoreError>> {
        let fut = self.query::<i64>(redis::cmd("DEL").arg(&key).clone());
        Box::pin(async move { Ok(fut.await? > 0) })
    }

    fn keys(&self, prefix: String) -> BoxFuture<'static, Result<Vec<String>, StoreError>> {
        let mut pattern = String::with_capacity(prefix.len() + 1);
        for c in prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        let conn = self.connection();
        Box::pin(async move {
            let mut conn = conn.await?;
            let mut cursor: u64 = 0;
            let mut keys = Vec::new();
            loop {
                let (next, batch): (u64, Vec<String>) = tokio::time::timeout(
                    REDIS_TIMEOUT,
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(500)
                        .query_async(&mut conn),
                )
                .await
                .map_err(|_| StoreError::Redis("redis did not answer in time".into()))?
                .map_err(redis_err)?;
                keys.extend(batch);
                cursor = next;
                if cursor == 0 || keys.len() >= 10_000 {
                    break;
                }
            }
            keys.sort();
            keys.dedup();
            Ok(keys)
        })
    }
}
