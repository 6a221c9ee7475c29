//! Userspace tables behind `require('userspace')`: JSON rows addressed by (area, key), in the
//! embedded store, so a form script can maintain a list a routing script reads.

use rusqlite::{params, OptionalExtension};
use serde_json::Value as Json;

use super::{now_ms, Store, StoreError};

/// CRUD on userspace rows.
#[derive(Debug, Clone)]
pub struct Userspace {
    store: Store,
}

impl Userspace {
    pub fn new(store: Store) -> Self {
        Userspace { store }
    }

    /// Insert a new row; an existing (area, key) is a conflict.
    pub async fn create(&self, area: String, key: String, data: Json) -> Result<(), StoreError> {
        self.store
            .with(move |c| {
                let inserted = c.execute(
                    "INSERT INTO userspace (area, key, data, updated_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (area, key) DO NOTHING",
                    params![area, key, data.to_string(), now_ms()],
                )?;
                if inserted == 0 {
                    return Err(StoreError::Conflict(format!(
                        "userspace '{area}' already has the key '{key}'"
                    )));
                }
                Ok(())
            })
            .await
    }

    pub async fn read(&self, area: String, key: String) -> Result<Option<Json>, StoreError> {
        self.store
            .with(move |c| {
                let text: Option<String> = c
                    .query_row(
                        "SELECT data FROM userspace WHERE area = ?1 AND key = ?2",
                        params![area, key],
                        |r| r.get(0),
                    )
                    .optional()?;
                Ok(text.map(|t| serde_json::from_str(&t).unwrap_or(Json::String(t))))
            })
            .await
    }

    /// Replace an existing row's data; a missing row is a conflict.
    pub async fn update(&self, area: String, key: String, data: Json) -> Result<(), StoreError> {
        self.store
            .with(move |c| {
                let updated = c.execute(
                    "UPDATE userspace SET data = ?3, updated_at = ?4 WHERE area = ?1 AND key = ?2",
                    params![area, key, data.to_string(), now_ms()],
                )?;
                if updated == 0 {
                    return Err(StoreError::Conflict(format!(
                        "userspace '{area}' has no key '{key}'"
                    )));
                }
                Ok(())
            })
            .await
    }

    /// Whether the row existed.
    pub async fn delete(&self, area: String, key: String) -> Result<bool, StoreError> {
        self.store
            .with(move |c| {
                Ok(c.execute(
                    "DELETE FROM userspace WHERE area = ?1 AND key = ?2",
                    params![area, key],
                )? > 0)
            })
            .await
    }

    /// The rows of an area as (key, data), sorted by key (at most 10,000).
    pub async fn rows(&self, area: String) -> Result<Vec<(String, Json)>, StoreError> {
        self.store
            .with(move |c| {
                let mut stmt = c.prepare(
                    "SELECT key, data FROM userspace WHERE area = ?1 ORDER BY key LIMIT 10000",
                )?;
                let rows = stmt
                    .query_map(params![area], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows
                    .into_iter()
                    .map(|(k, t)| (k, serde_json::from_str(&t).unwrap_or(Json::String(t))))
                    .collect())
            })
            .await
    }

    /// One row of the area picked at random, or `None` when the area is empty.
    pub async fn random(&self, area: String) -> Result<Option<(String, Json)>, StoreError> {
        self.store
            .with(move |c| {
                let row: Option<(String, String)> = c
                    .query_row(
                        "SELECT key, data FROM userspace WHERE area = ?1 ORDER BY random() LIMIT 1",
                        params![area],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                Ok(row.map(|(k, t)| (k, serde_json::from_str(&t).unwrap_or(Json::String(t)))))
            })
            .await
    }

    /// The keys of an area, sorted (at most 10,000).
    pub async fn list(&self, area: String) -> Result<Vec<String>, StoreError> {
        self.store
            .with(move |c| {
                let mut stmt = c.prepare(
                    "SELECT key FROM userspace WHERE area = ?1 ORDER BY key LIMIT 10000",
                )?;
                let keys = stmt
                    .query_map(params![area], |r| r.get(0))?
                    .collect::<Result<Vec<String>, _>>()?;
                Ok(keys)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Synchronous;

    #[tokio::test]
    async fn crud_and_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let u = Userspace::new(Store::open(&dir.path().join("u.db"), Synchronous::Normal).unwrap());
        u.create(
            "dnc".into(),
            "44".into(),
            serde_json::json!({"why": "asked"}),
        )
        .await
        .unwrap();
        let e = u
            .create("dnc".into(), "44".into(), Json::Null)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("already has"), "{e}");
        assert_eq!(
            u.read("dnc".into(), "44".into()).await.unwrap(),
            Some(serde_json::json!({"why": "asked"}))
        );
        u.update("dnc".into(), "44".into(), serde_json::json!(1))
            .await
            .unwrap();
        assert!(u
            .update("dnc".into(), "45".into(), Json::Null)
            .await
            .is_err());
        assert_eq!(u.list("dnc".into()).await.unwrap(), vec!["44"]);
        assert!(u.delete("dnc".into(), "44".into()).await.unwrap());
        assert_eq!(u.read("dnc".into(), "44".into()).await.unwrap(), None);
    }
}
