//! The `cxJob` queue in Redis (`[kv] backend = "redis://..."`), shared by the engines on that
//! Redis: any engine runs any due job. Every change is one Lua script, so two engines never
//! claim the same job. A claimed job holds a lease its runner renews; a job whose engine died
//! goes back to waiting when its lease runs out (that attempt does not count).

use serde_json::{json, Map, Value as Json};

use super::{
    jobs::{Claimed, NewJob},
    now_ms, RedisKv, StoreError,
};

const PREFIX: &str = "callforge:jobs:";

const ADD: &str = "local id = redis.call('INCR', ARGV[1] .. 'seq')
redis.call('HSET', ARGV[1] .. 'job:' .. id, 'id', id, 'script', ARGV[2], 'function', ARGV[3],
  'data', ARGV[4], 'attempts', ARGV[5], 'attempts_made', 0, 'backoff_ms', ARGV[6],
  'state', 'waiting', 'run_at', ARGV[7], 'created_at', ARGV[8])
redis.call('ZADD', ARGV[1] .. 'waiting', ARGV[7], id)
return id";

/// ARGV: prefix, now, limit, lease deadline. Returns the claimed ids.
const CLAIM: &str = "local ids = redis.call('ZRANGEBYSCORE', ARGV[1] .. 'waiting', '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
  redis.call('ZREM', ARGV[1] .. 'waiting', id)
  redis.call('ZADD', ARGV[1] .. 'active', ARGV[4], id)
  redis.call('HINCRBY', ARGV[1] .. 'job:' .. id, 'attempts_made', 1)
  redis.call('HSET', ARGV[1] .. 'job:' .. id, 'state', 'active')
end
return ids";

/// ARGV: prefix, now. Active jobs whose lease ran out wait again, without counting.
const RECOVER: &str =
    "local ids = redis.call('ZRANGEBYSCORE', ARGV[1] .. 'active', '-inf', ARGV[2])
for _, id in ipairs(ids) do
  local key = ARGV[1] .. 'job:' .. id
  redis.call('ZREM', ARGV[1] .. 'active', id)
  redis.call('ZADD', ARGV[1] .. 'waiting', ARGV[2], id)
  local made = tonumber(redis.call('HGET', key, 'attempts_made') or '1')
  redis.call('HSET', key, 'state', 'waiting', 'attempts_made', math.max(made - 1, 0))
end
return #ids";

/// ARGV: prefix, id, new deadline. Renews a lease while the job runs.
const RENEW: &str = "if redis.call('ZSCORE', ARGV[1] .. 'active', ARGV[2]) then
  redis.call('ZADD', ARGV[1] .. 'active', ARGV[3], ARGV[2]) end return 1";

/// ARGV: prefix, id, state, field, value, finished/retry time.
const FINISH: &str = "local key = ARGV[1] .. 'job:' .. ARGV[2]
redis.call('ZREM', ARGV[1] .. 'active', ARGV[2])
if ARGV[3] == 'waiting' then
  redis.call('HSET', key, 'state', 'waiting', 'error', ARGV[5], 'run_at', ARGV[6])
  redis.call('ZADD', ARGV[1] .. 'waiting', ARGV[6], ARGV[2])
else
  redis.call('HSET', key, 'state', ARGV[3], ARGV[4], ARGV[5], 'finished_at', ARGV[6])
  if ARGV[3] == 'completed' then redis.call('HDEL', key, 'error') end
  redis.call('ZADD', ARGV[1] .. 'finished', ARGV[6], ARGV[2])
end
return 1";

/// ARGV: prefix, id, field, value.
const SET_FIELD: &str = "local key = ARGV[1] .. 'job:' .. ARGV[2]
if redis.call('EXISTS', key) == 0 then return 0 end
redis.call('HSET', key, ARGV[3], ARGV[4]) return 1";

/// ARGV: prefix, before.
const PURGE: &str =
    "local ids = redis.call('ZRANGEBYSCORE', ARGV[1] .. 'finished', '-inf', '(' .. ARGV[2])
for _, id in ipairs(ids) do
  redis.call('DEL', ARGV[1] .. 'job:' .. id)
  redis.call('ZREM', ARGV[1] .. 'finished', id)
end
return #ids";

/// The queue's keys in one Redis.
#[derive(Debug, Clone)]
pub struct RedisJobs {
    redis: std::sync::Arc<RedisKv>,
}

fn eval(script: &str, args: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(0).arg(PREFIX);
    for a in args {
        cmd.arg(a);
    }
    cmd
}

fn parse(text: Option<&String>) -> Json {
    text.map(|t| serde_json::from_str(t).unwrap_or_else(|_| Json::String(t.clone())))
        .unwrap_or(Json::Null)
}

fn int(fields: &std::collections::HashMap<String, String>, key: &str) -> i64 {
    fields.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

impl RedisJobs {
    pub fn new(url: &str) -> Result<Self, StoreError> {
        Ok(RedisJobs {
            redis: std::sync::Arc::new(RedisKv::new(url)?),
        })
    }

    async fn fields(
        &self,
        id: i64,
    ) -> Result<Option<std::collections::HashMap<String, String>>, StoreError> {
        let fields: std::collections::HashMap<String, String> = self
            .redis
            .query(
                redis::cmd("HGETALL")
                    .arg(format!("{PREFIX}job:{id}"))
                    .clone(),
            )
            .await?;
        Ok((!fields.is_empty()).then_some(fields))
    }

    pub async fn add(&self, job: NewJob) -> Result<i64, StoreError> {
        let now = now_ms();
        self.redis
            .query(eval(
                ADD,
                &[
                    job.script,
                    job.function,
                    job.data.to_string(),
                    job.attempts.to_string(),
                    job.backoff_ms.to_string(),
                    (now + job.delay_ms as i64).to_string(),
                    now.to_string(),
                ],
            ))
            .await
    }

    pub async fn recover(&self) -> Result<usize, StoreError> {
        self.redis
            .query(eval(RECOVER, &[now_ms().to_string()]))
            .await
    }

    pub async fn claim_due(&self, limit: usize, lease_ms: i64) -> Result<Vec<Claimed>, StoreError> {
        let now = now_ms();
        let ids: Vec<i64> = self
            .redis
            .query(eval(
                CLAIM,
                &[
                    now.to_string(),
                    limit.to_string(),
                    (now + lease_ms).to_string(),
                ],
            ))
            .await?;
        let mut claimed = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(f) = self.fields(id).await? {
                claimed.push(Claimed {
                    id,
                    script: f.get("script").cloned().unwrap_or_default(),
                    function: f.get("function").cloned().unwrap_or_default(),
                    data: parse(f.get("data")),
                    attempts: int(&f, "attempts").max(1) as u32,
                    attempts_made: int(&f, "attempts_made").max(1) as u32,
                    backoff_ms: int(&f, "backoff_ms").max(0) as u64,
                });
            }
        }
        Ok(claimed)
    }

    pub async fn renew(&self, id: i64, lease_ms: i64) -> Result<(), StoreError> {
        self.redis
            .query::<i64>(eval(
                RENEW,
                &[id.to_string(), (now_ms() + lease_ms).to_string()],
            ))
            .await
            .map(|_| ())
    }

    pub async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        let first: Vec<(String, f64)> = self
            .redis
            .query(
                redis::cmd("ZRANGE")
                    .arg(format!("{PREFIX}waiting"))
                    .arg(0)
                    .arg(0)
                    .arg("WITHSCORES")
                    .clone(),
            )
            .await?;
        Ok(first.first().map(|(_, at)| *at as i64))
    }

    async fn finish(
        &self,
        id: i64,
        state: &str,
        field: &str,
        value: String,
        at: i64,
    ) -> Result<(), StoreError> {
        self.redis
            .query::<i64>(eval(
                FINISH,
                &[
                    id.to_string(),
                    state.into(),
                    field.into(),
                    value,
                    at.to_string(),
                ],
            ))
            .await
            .map(|_| ())
    }

    pub async fn complete(&self, id: i64, result: Json) -> Result<(), StoreError> {
        self.finish(id, "completed", "result", result.to_string(), now_ms())
            .await
    }

    pub async fn fail(
        &self,
        id: i64,
        error: String,
        retry_at: Option<i64>,
    ) -> Result<(), StoreError> {
        match retry_at {
            Some(at) => self.finish(id, "waiting", "error", error, at).await,
            None => self.finish(id, "failed", "error", error, now_ms()).await,
        }
    }

    pub async fn set_field(&self, id: i64, data: bool, value: Json) -> Result<bool, StoreError> {
        let field = if data { "job_data" } else { "progress" };
        let set: i64 = self
            .redis
            .query(eval(
                SET_FIELD,
                &[id.to_string(), field.into(), value.to_string()],
            ))
            .await?;
        Ok(set == 1)
    }

    pub async fn purge_finished(&self, before: i64) -> Result<usize, StoreError> {
        self.redis.query(eval(PURGE, &[before.to_string()])).await
    }

    /// The job as scripts see it, in the same shape as the embedded store's.
    pub async fn get(&self, id: i64) -> Result<Option<Json>, StoreError> {
        let Some(f) = self.fields(id).await? else {
            return Ok(None);
        };
        let mut row = Map::new();
        row.insert("id".into(), json!(id));
        for key in ["script", "function", "state"] {
            row.insert(key.into(), json!(f.get(key).cloned().unwrap_or_default()));
        }
        row.insert("attempts".into(), json!(int(&f, "attempts")));
        row.insert("attemptsMade".into(), json!(int(&f, "attempts_made")));
        row.insert("progress".into(), parse(f.get("progress")));
        row.insert("data".into(), parse(f.get("job_data")));
        row.insert("result".into(), parse(f.get("result")));
        row.insert("error".into(), json!(f.get("error")));
        row.insert("createdAt".into(), json!(int(&f, "created_at")));
        row.insert(
            "finishedAt".into(),
            json!(f.get("finished_at").and_then(|v| v.parse::<i64>().ok())),
        );
        Ok(Some(Json::Object(row)))
    }
}
