//! Userspace tables behind `require('userspace')`: JSON rows addressed by (area, key), in the
//! embedded store (or the shared PostgreSQL one), so a form script can maintain a list a
//! routing script reads.

use rusqlite::{params, OptionalExtension};
use serde_json::Value as Json;

use super::{now_ms, postgres::PgStore, Store, StoreError};

/// CRUD on userspace rows.
#[derive(Debug, Clone)]
pub struct Userspace {
    store: Store,
    /// When set, rows live in PostgreSQL and `store` is not used.
    pg: Option<PgStore>,
}

impl Userspace {
    pub fn new(store: Store) -> Self {
        Userspace { store, pg: None }
    }

    /// Rows in the shared PostgreSQL database: every engine sees the same tables.
    pub fn postgres(store: Store, pg: PgStore) -> Self {
        Userspace {
            store,
            pg: Some(pg),
        }
    }

    /// Insert a new row; an existing (area, key) is a conflict.
    pub async fn create(&self, area: String, key: String, data: Json) -> Result<(), StoreError> {
        if let Some(pg) = &self.pg {
            return pg
                .with(move |c| async move {
                    let inserted = c
                        .execute(
                            "INSERT INTO userspace (area, key, data, updated_at) VALUES ($1, $2, $3, $4)
                             ON CONFLICT (area, key) DO NOTHING",
                            &[&area, &key, &data.to_string(), &now_ms()],
                        )
                        .await?;
                    if inserted == 0 {
                        return Err(StoreError::Conflict(format!(
                            "userspace '{area}' already has the key '{key}'"
                        )));
                    }
                    Ok(())
                })
                .await;
        }
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
        if let Some(pg) = &self.pg {
            return pg
                .with(move |c| async move {
                    let row = c
                        .query_opt(
                            "SELECT data FROM userspace WHERE area = $1 AND key = $2",
                            &[&area, &key],
                        )
                        .await?;
                    let text: Option<String> = row.map(|r| r.try_get(0)).transpose()?;
                    Ok(text.map(|t| serde_json::from_str(&t).unwrap_or(Json::String(t))))
                })
                .await;
        }
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
        if let Some(pg) = &self.pg {
            return pg
                .with(move |c| async move {
                    let updated = c
                        .execute(
                            "UPDATE userspace SET data = $3, updated_at = $4 WHERE area = $1 AND key = $2",
                            &[&area, &key, &data.to_string(), &now_ms()],
                        )
                        .await?;
                    if updated == 0 {
                        return Err(StoreError::Conflict(format!(
                            "userspace '{area}' has no key '{key}'"
                        )));
                    }
                    Ok(())
                })
                .await;
        }
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
        if let Some(pg) = &self.pg {
            return pg
                .with(move |c| async move {
                    Ok(c.execute(
                        "DELETE FROM userspace WHERE area = $1 AND key = $2",
                        &[&area, &key],
                    )
                    .await?
                        > 0)
                })
                .await;
        }
        self.store
            .with(move |c| {
                Ok(c.execute(
                    "DELETE FROM userspace WHERE area = ?1 AND key = ?2",
                    params![area, key],
                )? > 0)
            })
            .await
    }

    /// The keys of an area, sorted (at most 10,000).
    pub async fn list(&self, area: String) -> Result<Vec<String>, StoreError> {
        if let Some(pg) = &self.pg {
            return pg
                .with(move |c| async move {
                    let rows = c
                        .query(
                            "SELECT key FROM userspace WHERE area = $1 ORDER BY key LIMIT 10000",
                            &[&area],
                        )
                        .await?;
                    Ok(rows
                        .iter()
                        .map(|r| r.try_get(0))
                        .collect::<Result<Vec<String>, _>>()?)
                })
                .await;
        }
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
