//! `api.lookup.{tps, lrn, hlr, nnpc, asrplus, ping, userspaceLookup}` (also `require('lookup')`):
//! number lookups answered by a configured provider, a local table or an HTTP API.
//!
//! Table answers are `{number, table, found, ...row}`; HTTP answers are the API's JSON,
//! cached per (lookup, number, table) for `cache_ttl_s`.

use std::{
    collections::{BTreeMap, HashMap},
    num::NonZeroUsize,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde_json::{Map, Value as Json};

use super::{args, fetch::read_capped, kv::store_error, ModuleError};
use crate::{
    config::{Config, LookupConfig},
    script::{HostCall, HostError, HostMethod, HostModule, HostObject},
    store::Userspace,
};

/// The lookups a provider can be configured for.
pub const LOOKUPS: [&str; 6] = ["tps", "lrn", "hlr", "nnpc", "asrplus", "ping"];
const MAX_LOOKUP_RESPONSE: usize = 1024 * 1024;
const CACHE_ENTRIES: usize = 10_000;

const METHODS: &[HostMethod] = &[
    HostMethod::asynchronous("tps"),
    HostMethod::asynchronous("lrn"),
    HostMethod::asynchronous("hlr"),
    HostMethod::asynchronous("nnpc"),
    HostMethod::asynchronous("asrplus"),
    HostMethod::asynchronous("ping"),
    HostMethod::asynchronous("userspaceLookup"),
];

fn lookup_error(message: impl Into<String>) -> HostError {
    HostError::new("LookupError", message)
}

/// Numbers match with surrounding space and a leading `+` ignored.
fn normalise(number: &str) -> &str {
    number.trim().trim_start_matches('+')
}

fn valid_identifier(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `{number, table, found, ...row}`.
fn answer(number: &str, table: &str, row: Option<Json>) -> Json {
    let found = row.is_some();
    let mut out = Map::new();
    match row {
        Some(Json::Object(fields)) => out.extend(fields),
        Some(other) => {
            out.insert("data".into(), other);
        }
        None => {}
    }
    out.insert("number".into(), Json::String(number.to_string()));
    out.insert("table".into(), Json::String(table.to_string()));
    out.insert("found".into(), Json::Bool(found));
    Json::Object(out)
}

/// Rows of a table by normalised number.
type Rows = Arc<HashMap<String, Json>>;

/// A CSV file (first row = header), reloaded when its modification time changes.
struct CsvTable {
    path: PathBuf,
    key_column: String,
    loaded: Mutex<(Option<SystemTime>, Rows)>,
}

impl CsvTable {
    fn load(path: &Path, key_column: &str) -> Result<HashMap<String, Json>, String> {
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .trim(csv::Trim::All)
            .from_path(path)
            .map_err(|e| e.to_string())?;
        let headers = reader.headers().map_err(|e| e.to_string())?.clone();
        let key_index = headers
            .iter()
            .position(|h| h == key_column)
            .ok_or_else(|| format!("no column '{key_column}' in the header"))?;
        let mut rows = HashMap::new();
        for record in reader.records() {
            let record = record.map_err(|e| e.to_string())?;
            let Some(key) = record.get(key_index) else {
                continue;
            };
            let row: Map<String, Json> = headers
                .iter()
                .zip(record.iter())
                .map(|(h, v)| (h.to_string(), Json::String(v.to_string())))
                .collect();
            rows.insert(normalise(key).to_string(), Json::Object(row));
        }
        Ok(rows)
    }

    fn rows(&self) -> Result<Rows, String> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.0 != Some(modified) {
            let rows = Self::load(&self.path, &self.key_column)
                .map_err(|e| format!("{}: {e}", self.path.display()))?;
            *loaded = (Some(modified), Arc::new(rows));
        }
        Ok(loaded.1.clone())
    }
}

/// A table in an SQLite file of the operator's, opened read-only.
struct SqliteTable {
    path: PathBuf,
    table: String,
    key_column: String,
    conn: Mutex<Option<Connection>>,
}

impl SqliteTable {
    fn find(&self, table: &str, number: &str) -> Result<Option<Json>, String> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let conn = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(|e| format!("{}: {e}", self.path.display()))?;
            *slot = Some(conn);
        }
        let Some(conn) = slot.as_ref() else {
            return Err("no connection".into());
        };
        let sql = format!(
            "SELECT * FROM \"{table}\" WHERE \"{}\" = ?1 LIMIT 1",
            self.key_column
        );
        let mut stmt = conn.prepare_cached(&sql).map_err(|e| e.to_string())?;
        let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
        stmt.query_row([normalise(number)], |r| {
            let mut row = Map::new();
            for (i, name) in names.iter().enumerate() {
                let v = match r.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => Json::Null,
                    rusqlite::types::ValueRef::Integer(n) => Json::from(n),
                    rusqlite::types::ValueRef::Real(f) => Json::from(f),
                    rusqlite::types::ValueRef::Text(t) => {
                        Json::String(String::from_utf8_lossy(t).into_owned())
                    }
                    rusqlite::types::ValueRef::Blob(_) => Json::Null,
                };
                row.insert(name.clone(), v);
            }
            Ok(Json::Object(row))
        })
        .optional()
        .map_err(|e| e.to_string())
    }
}

struct HttpLookup {
    url: String,
    method: reqwest::Method,
    timeout: Duration,
    auth_header: Option<String>,
    headers: BTreeMap<String, String>,
    cache_ttl: Duration,
}

enum Provider {
    Csv(Arc<CsvTable>),
    Sqlite(Arc<SqliteTable>),
    Userspace(String),
    Http(Arc<HttpLookup>),
}

/// The configured lookups, shared by every run.
pub struct LookupService {
    providers: BTreeMap<String, Provider>,
    userspace: Userspace,
    client: reqwest::Client,
    cache: Mutex<lru::LruCache<String, (Instant, Json)>>,
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl LookupService {
    pub fn new(config: &Config, userspace: Userspace) -> Result<Self, ModuleError> {
        let mut providers = BTreeMap::new();
        for (name, lookup) in &config.lookup {
            let key = format!("lookup.{name}");
            if !LOOKUPS.contains(&name.as_str()) {
                return Err(ModuleError::config(
                    key,
                    format!("unknown lookup; expected one of {}", LOOKUPS.join(", ")),
                ));
            }
            let provider = match lookup {
                LookupConfig::Table {
                    csv,
                    sqlite,
                    table,
                    userspace,
                    key_column,
                } => {
                    let key_column = key_column.clone().unwrap_or_else(|| "number".into());
                    match (csv, sqlite, userspace) {
                        (Some(csv), None, None) => {
                            let path = config.resolve(csv);
                            let rows = CsvTable::load(&path, &key_column).map_err(|e| {
                                ModuleError::config(&key, format!("csv {}: {e}", path.display()))
                            })?;
                            let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                            Provider::Csv(Arc::new(CsvTable {
                                path,
                                key_column,
                                loaded: Mutex::new((modified, Arc::new(rows))),
                            }))
                        }
                        (None, Some(db), None) => {
                            let table = table.clone().ok_or_else(|| {
                                ModuleError::config(&key, "sqlite needs table = \"name\"")
                            })?;
                            if !valid_identifier(&table) || !valid_identifier(&key_column) {
                                return Err(ModuleError::config(
                                    &key,
                                    "table and key_column must be letters, digits or _",
                                ));
                            }
                            let path = config.resolve(db);
                            if !path.is_file() {
                                return Err(ModuleError::config(
                                    &key,
                                    format!("sqlite file {} does not exist", path.display()),
                                ));
                            }
                            Provider::Sqlite(Arc::new(SqliteTable {
                                path,
                                table,
                                key_column,
                                conn: Mutex::new(None),
                            }))
                        }
                        (None, None, Some(area)) => Provider::Userspace(area.clone()),
                        _ => return Err(ModuleError::config(
                            &key,
                            "provider = \"table\" needs exactly one of csv, sqlite or userspace",
                        )),
                    }
                }
                LookupConfig::Http {
                    url,
                    method,
                    timeout_ms,
                    auth_header,
                    headers,
                    cache_ttl_s,
                } => {
                    let probe = url.replace("{number}", "0").replace("{table}", "t");
                    let parsed = reqwest::Url::parse(&probe)
                        .map_err(|e| ModuleError::config(&key, format!("url {url}: {e}")))?;
                    if !matches!(parsed.scheme(), "http" | "https") {
                        return Err(ModuleError::config(&key, "url must be http:// or https://"));
                    }
                    let method = match method.to_ascii_uppercase().as_str() {
                        "GET" => reqwest::Method::GET,
                        "POST" => reqwest::Method::POST,
                        other => {
                            return Err(ModuleError::config(
                                &key,
                                format!("method {other}: expected GET or POST"),
                            ))
                        }
                    };
                    Provider::Http(Arc::new(HttpLookup {
                        url: url.clone(),
                        method,
                        timeout: Duration::from_millis((*timeout_ms).max(1)),
                        auth_header: auth_header.clone(),
                        headers: headers.clone(),
                        cache_ttl: Duration::from_secs(*cache_ttl_s),
                    }))
                }
            };
            providers.insert(name.clone(), provider);
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ModuleError::config("lookup", format!("HTTP client: {e}")))?;
        Ok(LookupService {
            providers,
            userspace,
            client,
            cache: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN),
            )),
        })
    }

    /// Answer `api.lookup.<name>(args...)`.
    pub fn call(self: &Arc<Self>, name: &str, args: Vec<Json>) -> HostCall {
        let method = format!("api.lookup.{name}");
        if name == "userspaceLookup" {
            let (table, number) = match (
                args::string(&method, &args, 0, "table"),
                args::string(&method, &args, 1, "number"),
            ) {
                (Ok(t), Ok(n)) => (t, n),
                (Err(e), _) | (_, Err(e)) => return HostCall::Ready(Err(e)),
            };
            let userspace = self.userspace.clone();
            return HostCall::Pending(Box::pin(async move {
                let row = userspace
                    .read(table.clone(), normalise(&number).to_string())
                    .await
                    .map_err(store_error)?;
                Ok(answer(&number, &table, row))
            }));
        }
        if !LOOKUPS.contains(&name) {
            return HostCall::Ready(Err(HostError::type_error(format!(
                "{method} does not exist"
            ))));
        }
        if !self.providers.contains_key(name) {
            return HostCall::Ready(Err(lookup_error(format!(
                "{method} is not configured: add a [lookup.{name}] section to callforge.toml (provider = \"table\" or \"http\")"
            ))));
        }
        let number = match args::string(&method, &args, 0, "number") {
            Ok(n) => n,
            Err(e) => return HostCall::Ready(Err(e)),
        };
        let table = match args::opt_string(&method, &args, 1, "table") {
            Ok(t) => t,
            Err(e) => return HostCall::Ready(Err(e)),
        };
        let service = self.clone();
        let name = name.to_string();
        HostCall::Pending(Box::pin(async move {
            service.answer(&method, &name, number, table).await
        }))
    }

    async fn answer(
        &self,
        method: &str,
        name: &str,
        number: String,
        table: Option<String>,
    ) -> Result<Json, HostError> {
        let Some(provider) = self.providers.get(name) else {
            return Err(lookup_error(format!("{method} is not configured")));
        };
        match provider {
            Provider::Csv(csv) => {
                let csv = csv.clone();
                let label = table.unwrap_or_else(|| name.to_string());
                let key = normalise(&number).to_string();
                let rows = tokio::task::spawn_blocking(move || csv.rows())
                    .await
                    .map_err(|e| lookup_error(format!("{method}: {e}")))?
                    .map_err(|e| lookup_error(format!("{method}: {e}")))?;
                Ok(answer(&number, &label, rows.get(&key).cloned()))
            }
            Provider::Sqlite(db) => {
                let db = db.clone();
                let table = table.unwrap_or_else(|| db.table.clone());
                if !valid_identifier(&table) {
                    return Err(HostError::type_error(format!(
                        "{method}: table must be letters, digits or _"
                    )));
                }
                let (t, n) = (table.clone(), number.clone());
                let row = tokio::task::spawn_blocking(move || db.find(&t, &n))
                    .await
                    .map_err(|e| lookup_error(format!("{method}: {e}")))?
                    .map_err(|e| lookup_error(format!("{method}: {e}")))?;
                Ok(answer(&number, &table, row))
            }
            Provider::Userspace(area) => {
                let area = table.unwrap_or_else(|| area.clone());
                let row = self
                    .userspace
                    .read(area.clone(), normalise(&number).to_string())
                    .await
                    .map_err(store_error)?;
                Ok(answer(&number, &area, row))
            }
            Provider::Http(http) => self.http(method, name, http, number, table).await,
        }
    }

    async fn http(
        &self,
        method: &str,
        name: &str,
        http: &HttpLookup,
        number: String,
        table: Option<String>,
    ) -> Result<Json, HostError> {
        let table = table.unwrap_or_default();
        let cache_key = format!("{name}\u{0}{number}\u{0}{table}");
        if !http.cache_ttl.is_zero() {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, value)) = cache.get(&cache_key) {
                if at.elapsed() < http.cache_ttl {
                    return Ok(value.clone());
                }
            }
        }
        let url = http
            .url
            .replace("{number}", &url_encode(&number))
            .replace("{table}", &url_encode(&table));
        let mut request = self
            .client
            .request(http.method.clone(), &url)
            .timeout(http.timeout)
            .header("accept", "application/json");
        if let Some(auth) = &http.auth_header {
            request = request.header("authorization", auth);
        }
        for (k, v) in &http.headers {
            request = request.header(k, v);
        }
        if http.method == reqwest::Method::POST {
            request = request.json(&serde_json::json!({"number": number, "table": table}));
        }
        let response = request.send().await.map_err(|e| {
            let why = if e.is_timeout() {
                format!("timed out after {} ms", http.timeout.as_millis())
            } else {
                format!("{e}")
            };
            lookup_error(format!("{method}: {url}: {why}"))
        })?;
        let status = response.status();
        let body = tokio::time::timeout(http.timeout, read_capped(response, MAX_LOOKUP_RESPONSE))
            .await
            .map_err(|_| {
                lookup_error(format!(
                    "{method}: {url}: timed out after {} ms",
                    http.timeout.as_millis()
                ))
            })?
            .map_err(|e| lookup_error(format!("{method}: {url}: {e}")))?;
        if !status.is_success() {
            return Err(lookup_error(format!(
                "{method}: {url} answered {}",
                status.as_u16()
            )));
        }
        let value: Json = serde_json::from_slice(&body)
            .map_err(|e| lookup_error(format!("{method}: {url} did not answer JSON: {e}")))?;
        if !http.cache_ttl.is_zero() {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.put(cache_key, (Instant::now(), value.clone()));
        }
        Ok(value)
    }
}

/// `require('lookup')`: the same lookups as `api.lookup`.
pub struct LookupModule {
    service: Arc<LookupService>,
}

impl LookupModule {
    pub fn new(service: Arc<LookupService>) -> Self {
        LookupModule { service }
    }
}

impl HostModule for LookupModule {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(LookupObject {
            service: self.service.clone(),
        })
    }
}

struct LookupObject {
    service: Arc<LookupService>,
}

impl HostObject for LookupObject {
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

    #[test]
    fn answers_merge_rows_and_say_whether_found() {
        assert_eq!(
            answer("44", "tps", None),
            serde_json::json!({"number": "44", "table": "tps", "found": false})
        );
        let a = answer(
            "44",
            "lrn",
            Some(serde_json::json!({"lrn": "123", "number": "x"})),
        );
        assert_eq!(a["lrn"], "123");
        assert_eq!(a["number"], "44");
        assert_eq!(a["found"], true);
        assert_eq!(
            answer("1", "u", Some(serde_json::json!(true)))["data"],
            true
        );
        assert_eq!(normalise(" +4477 "), "4477");
        assert_eq!(url_encode("+44 7"), "%2B44%207");
    }
}
