//! Reading execution records and CDRs back from PostgreSQL, a page at a time (the same
//! window and cursor rules as the SQLite store). Writing goes through the outbox.

use serde_json::Value as Json;
use tokio_postgres::Row;

use super::{
    postgres::{Client, PgStore},
    records::{parse_json, Cdr, CdrError, ExecutionRecord, Page, RecordQuery, MAX_PAGE},
    StoreError,
};

async fn page<T>(
    client: Client,
    table: &'static str,
    q: RecordQuery,
    row: impl Fn(&Row) -> Result<T, tokio_postgres::Error>,
) -> Result<Page<T>, StoreError> {
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let sql = format!(
        "SELECT * FROM {table} WHERE started_at >= $1 AND started_at < $2 AND id > $3 ORDER BY id LIMIT $4"
    );
    let rows = client
        .query(
            &sql,
            &[
                &q.from.unwrap_or(i64::MIN),
                &q.to.unwrap_or(i64::MAX),
                &q.after.unwrap_or(0),
                &((limit + 1) as i64),
            ],
        )
        .await?;
    let mut items = rows
        .iter()
        .map(|r| Ok((r.try_get::<_, i64>("id")?, row(r)?)))
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|(id, _)| *id)
    } else {
        None
    };
    Ok(Page {
        items: items.into_iter().map(|(_, t)| t).collect(),
        next,
    })
}

fn code(r: &Row, col: &str) -> Result<Option<u16>, tokio_postgres::Error> {
    Ok(r.try_get::<_, Option<i32>>(col)?
        .and_then(|c| u16::try_from(c).ok()))
}

pub async fn executions(pg: &PgStore, q: RecordQuery) -> Result<Page<ExecutionRecord>, StoreError> {
    pg.with(move |client| {
        page(client, "executions", q, |r| {
            Ok(ExecutionRecord {
                id: r.try_get("id")?,
                started_at: r.try_get("started_at")?,
                script: r.try_get("script")?,
                mode: r.try_get("mode")?,
                function: r.try_get("function")?,
                duration_us: r.try_get::<_, i64>("duration_us")?.max(0) as u64,
                ok: r.try_get("ok")?,
                code: code(r, "code")?,
                message: r.try_get("message")?,
                result: parse_json(r.try_get("result")?),
            })
        })
    })
    .await
}

pub async fn cdrs(pg: &PgStore, q: RecordQuery) -> Result<Page<Cdr>, StoreError> {
    pg.with(move |client| {
        page(client, "cdrs", q, |r| {
            let list = |col: &str| -> Result<Json, tokio_postgres::Error> {
                Ok(parse_json(r.try_get(col)?).unwrap_or(Json::Array(vec![])))
            };
            let strings =
                |v: Json| -> Vec<String> { serde_json::from_value(v).unwrap_or_default() };
            let message: Option<String> = r.try_get("error_message")?;
            Ok(Cdr {
                id: r.try_get("id")?,
                call_id: r.try_get("call_id")?,
                from: r.try_get("from_uri")?,
                to: r.try_get("to_uri")?,
                script: r.try_get("script")?,
                started_at: r.try_get("started_at")?,
                answered_at: r.try_get("answered_at")?,
                ended_at: r.try_get("ended_at")?,
                hangup_cause: r.try_get("hangup_cause")?,
                hangup_side: r.try_get("hangup_side")?,
                digits: strings(list("digits")?),
                recordings: strings(list("recordings")?),
                legs: serde_json::from_value(list("legs")?).unwrap_or_default(),
                result: parse_json(r.try_get("result")?),
                error: code(r, "error_code")?.map(|code| CdrError {
                    code,
                    message: message.unwrap_or_default(),
                }),
            })
        })
    })
    .await
}
