//! The key-value store behind `require('kv')`: the trait and its embedded SQLite backend.
//!
//! Values are JSON. `incr` is atomic and its expiry is set when the increment creates the
//! key (or finds it expired): a fixed-window counter, as fraud honeypots need.

use std::time::Duration;

use futures::future::BoxFuture;
use rusqlite::{params, OptionalExtension};
use serde_json::Value as Json;

use super::{now_ms, Store, StoreError};

/// A KV backend. Futures are `'static` so they can be awaited from any script worker.
pub trait Kv: Send + Sync {
    fn get(&self, key: String) -> BoxFuture<'static, Result<Option<Json>, StoreError>>;
    fn set(
        &self,
        key: String,
        value: Json,
        ttl: Option<Duration>,
    ) -> BoxFuture<'static, Result<(), StoreError>>;
    /// Add `by` to the integer at `key` (missing counts as 0) and return the new value.
    fn incr(
        &self,
        key: String,
        by: i64,
        expire: Option<Duration>,
    ) -> BoxFuture<'static, Result<i64, StoreError>>;
    /// Whether the key existed.
    fn del(&self, key: String) -> BoxFuture<'static, Result<bool, StoreError>>;
    /// Live keys starting with `prefix`, sorted.
    fn keys(&self, prefix: String) -> BoxFuture<'static, Result<Vec<String>, StoreError>>;
}

/// The embedded KV backend: the `kv` table of the SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteKv {
    store: Store,
}

fn expiry(ttl: Option<Duration>) -> Option<i64> {
    ttl.filter(|d| !d.is_zero())
        .map(|d| now_ms().saturating_add(d.as_millis().min(i64::MAX as u128) as i64))
}

/// Escape `%`, `_` and `\` for a `LIKE ... ESCAPE '\'` prefix match.
fn like_prefix(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

impl SqliteKv {
    pub fn new(store: Store) -> Self {
        SqliteKv { store }
    }
}

impl Kv for SqliteKv {
    fn get(&self, key: String) -> BoxFuture<'static, Result<Option<Json>, StoreError>> {
        let store = self.store.clone();
        Box::pin(async move {
            store
                .with(move |c| {
                    let text: Option<String> = c
                        .query_row(
                            "SELECT value FROM kv WHERE key = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
                            params![key, now_ms()],
                            |r| r.get(0),
                        )
                        .optional()?;
                    Ok(text.map(|t| serde_json::from_str(&t).unwrap_or(Json::String(t))))
                })
                .await
        })
    }

    fn set(
        &self,
        key: String,
        value: Json,
        ttl: Option<Duration>,
    ) -> BoxFuture<'static, Result<(), StoreError>> {
        let store = self.store.clone();
        Box::pin(async move {
            let text = value.to_string();
            store
                .with(move |c| {
                    c.execute(
                        "INSERT INTO kv (key, value, expires_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                        params![key, text, expiry(ttl)],
                    )?;
                    Ok(())
                })
                .await
        })
    }

    fn incr(
        &self,
        key: String,
        by: i64,
        expire: Option<Duration>,
    ) -> BoxFuture<'static, Result<i64, StoreError>> {
        let store = self.store.clone();
        Box::pin(async move {
            store
                .with(move |c| {
                    let tx = c.transaction()?;
                    let now = now_ms();
                    let current: Option<(String, Option<i64>)> = tx
                        .query_row(
                            "SELECT value, expires_at FROM kv WHERE key = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
                            params![key, now],
                            |r| Ok((r.get(0)?, r.get(1)?)),
                        )
                        .optional()?;
                    let (value, expires_at) = match current {
                        None => (by, expiry(expire)),
                        Some((text, expires_at)) => {
                            let n = text
                                .trim_matches('"')
                                .parse::<i64>()
                                .map_err(|_| StoreError::NotInteger(key.clone()))?;
                            (n.saturating_add(by), expires_at)
                        }
                    };
                    tx.execute(
                        "INSERT INTO kv (key, value, expires_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at",
                        params![key, value.to_string(), expires_at],
                    )?;
                    tx.commit()?;
                    Ok(value)
                })
                .await
        })
    }

    fn del(&self, key: String) -> BoxFuture<'static, Result<bool, StoreError>> {
        let store = self.store.clone();
        Box::pin(async move {
            store
                .with(move |c| {
                    let live = c.execute(
                        "DELETE FROM kv WHERE key = ?1 AND (expires_at IS NULL OR expires_at > ?2)",
                        params![key, now_ms()],
                    )?;
                    c.execute("DELETE FROM kv WHERE key = ?1", params![key])?;
                    Ok(live > 0)
                })
                .await
        })
    }

    fn keys(&self, prefix: String) -> BoxFuture<'static, Result<Vec<String>, StoreError>> {
        let store = self.store.clone();
        Box::pin(async move {
            store
                .with(move |c| {
                    let now = now_ms();
                    c.execute(
                        "DELETE FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ?1",
                        params![now],
                    )?;
                    let mut stmt = c.prepare(
                        "SELECT key FROM kv WHERE key LIKE ?1 ESCAPE '\\' ORDER BY key LIMIT 10000",
                    )?;
                    let keys = stmt
                        .query_map(params![like_prefix(&prefix)], |r| r.get(0))?
                        .collect::<Result<Vec<String>, _>>()?;
                    Ok(keys)
                })
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Synchronous;

    fn kv() -> (tempfile::TempDir, SqliteKv) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db"), Synchronous::Normal).unwrap();
        (dir, SqliteKv::new(store))
    }

    #[tokio::test]
    async fn set_get_del_keys_and_ttl() {
        let (_d, kv) = kv();
        kv.set("a:1".into(), serde_json::json!({"x": 1}), None)
            .await
            .unwrap();
        kv.set("a_2".into(), serde_json::json!("s"), None)
            .await
            .unwrap();
        kv.set(
            "b".into(),
            serde_json::json!(3),
            Some(Duration::from_millis(30)),
        )
        .await
        .unwrap();
        assert_eq!(
            kv.get("a:1".into()).await.unwrap(),
            Some(serde_json::json!({"x": 1}))
        );
        assert_eq!(kv.keys("a:".into()).await.unwrap(), vec!["a:1"]);
        assert_eq!(kv.keys("".into()).await.unwrap().len(), 3);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(kv.get("b".into()).await.unwrap(), None);
        assert!(kv.del("a:1".into()).await.unwrap());
        assert!(!kv.del("a:1".into()).await.unwrap());
        assert!(!kv.del("b".into()).await.unwrap());
    }

    #[tokio::test]
    async fn incr_counts_expires_and_refuses_non_integers() {
        let (_d, kv) = kv();
        assert_eq!(kv.incr("n".into(), 2, None).await.unwrap(), 2);
        assert_eq!(kv.incr("n".into(), -5, None).await.unwrap(), -3);
        assert_eq!(
            kv.incr("w".into(), 1, Some(Duration::from_millis(30)))
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            kv.incr("w".into(), 1, Some(Duration::from_secs(60)))
                .await
                .unwrap(),
            2
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(kv.incr("w".into(), 1, None).await.unwrap(), 1);
        kv.set("s".into(), serde_json::json!("abc"), None)
            .await
            .unwrap();
        let e = kv.incr("s".into(), 1, None).await.unwrap_err();
        assert!(e.to_string().contains("not an integer"), "{e}");
    }
}
