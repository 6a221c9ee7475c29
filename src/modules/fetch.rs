//! The global `fetch(url, {method, headers, body, timeout})`: HTTP with reqwest, limited to the
//! hosts in `[fetch] allow`, with a response size cap and a timeout. The raw host call answers
//! `{status, statusText, url, headers, body}`; a JS prelude wraps it in a WHATWG-shaped
//! `Response` (`status`, `ok`, `headers.get`, `text()`, `json()`).

use std::{sync::Arc, time::Duration};

use serde_json::{json, Value as Json};

use super::ModuleError;
use crate::{
    config::FetchConfig,
    script::{HostCall, HostError, HostMethod, HostModule, HostObject},
};

const PRELUDE: &str = r#"(function (raw) {
  class Headers {
    constructor(pairs) { this._pairs = Array.isArray(pairs) ? pairs : []; }
    get(name) {
      const n = String(name).toLowerCase();
      const v = this._pairs.filter((p) => p[0] === n).map((p) => p[1]);
      return v.length ? v.join(", ") : null;
    }
    has(name) { return this.get(name) !== null; }
    forEach(cb, thisArg) { for (const p of this._pairs) cb.call(thisArg, p[1], p[0], this); }
    entries() { return this._pairs.map((p) => [p[0], p[1]])[Symbol.iterator](); }
    keys() { return this._pairs.map((p) => p[0])[Symbol.iterator](); }
    values() { return this._pairs.map((p) => p[1])[Symbol.iterator](); }
    [Symbol.iterator]() { return this.entries(); }
  }
  class Response {
    constructor(r) {
      this.status = r.status;
      this.statusText = r.statusText;
      this.ok = r.status >= 200 && r.status < 300;
      this.url = r.url;
      this.redirected = r.redirected;
      this.type = "basic";
      this.headers = new Headers(r.headers);
      this.bodyUsed = false;
      this._body = r.body;
    }
    _take() {
      if (this.bodyUsed) return Promise.reject(new TypeError("fetch: the body was already read"));
      this.bodyUsed = true;
      return Promise.resolve(this._body);
    }
    text() { return this._take(); }
    json() { return this._take().then((t) => JSON.parse(t)); }
  }
  return function fetch(input, init) {
    const url = typeof input === "string" ? input : input && input.url ? input.url : String(input);
    let options = init === undefined ? null : init;
    if (options && options.headers instanceof Headers) {
      const h = {};
      options.headers.forEach((v, k) => { h[k] = v; });
      options = Object.assign({}, options, { headers: h });
    }
    return raw.request(url, options).then((r) => new Response(r));
  };
})"#;

/// One `[fetch] allow` entry: a host, optionally with a port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allowed {
    host: String,
    port: Option<u16>,
}

fn parse_allowed(entry: &str) -> Result<Allowed, String> {
    let entry = entry.trim();
    let url = reqwest::Url::parse(&format!("http://{entry}/"))
        .map_err(|e| format!("'{entry}' is not a host or host:port ({e})"))?;
    let host = url
        .host_str()
        .ok_or_else(|| format!("'{entry}' has no host"))?
        .to_ascii_lowercase();
    if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
        return Err(format!("'{entry}' must be a host or host:port, not a URL"));
    }
    // Url drops the port when it is the scheme's default; keep what the entry said.
    let port = url.port().or_else(|| {
        entry
            .rsplit_once(':')
            .filter(|(h, _)| !h.ends_with(':'))
            .and_then(|(_, p)| p.parse().ok())
    });
    Ok(Allowed { host, port })
}

/// One `[fetch] resolve` entry: a host name (no port) and the socket address to connect to.
fn parse_resolve(host: &str, addr: &str) -> Result<(String, std::net::SocketAddr), String> {
    let name = host.trim().to_ascii_lowercase();
    if name.is_empty() || name.contains([':', '/', '[', ']']) {
        return Err(format!(
            "'{host}' must be a host name, without port or scheme"
        ));
    }
    let addr = addr
        .trim()
        .parse()
        .map_err(|_| format!("{host} = '{addr}' must be IP:port, e.g. \"127.0.0.1:8080\""))?;
    Ok((name, addr))
}

fn is_allowed(allow: &[Allowed], url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.to_ascii_lowercase();
    let port = url.port_or_known_default();
    allow
        .iter()
        .any(|a| a.host == host && (a.port.is_none() || a.port == port))
}

/// Read a response body, failing once it exceeds `cap` bytes.
pub(crate) async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, String> {
    if let Some(len) = response.content_length() {
        if len > cap as u64 {
            return Err(format!(
                "response larger than the {cap}-byte limit ({len} bytes)"
            ));
        }
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > cap {
            return Err(format!("response larger than the {cap}-byte limit"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The shared client and limits behind every run's `fetch`.
pub struct FetchService {
    client: reqwest::Client,
    allow: Arc<Vec<Allowed>>,
    max_bytes: usize,
    timeout: Duration,
}

fn fetch_error(message: impl Into<String>) -> HostError {
    HostError::type_error(format!("fetch: {}", message.into()))
}

impl FetchService {
    pub fn new(config: &FetchConfig) -> Result<Self, ModuleError> {
        let allow = config
            .allow
            .iter()
            .map(|e| parse_allowed(e))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ModuleError::config("fetch", format!("allow: {e}")))?;
        let allow = Arc::new(allow);
        let policy_allow = allow.clone();
        let mut builder = reqwest::Client::builder();
        for (host, addr) in &config.resolve {
            let (host, addr) = parse_resolve(host, addr)
                .map_err(|e| ModuleError::config("fetch", format!("resolve: {e}")))?;
            builder = builder.resolve(&host, addr);
        }
        let client = builder
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 5 {
                    attempt.error("more than 5 redirects")
                } else if is_allowed(&policy_allow, attempt.url()) {
                    attempt.follow()
                } else {
                    let to = attempt.url().host_str().unwrap_or("").to_string();
                    attempt.error(format!("redirect to host '{to}' is not in [fetch] allow"))
                }
            }))
            .build()
            .map_err(|e| ModuleError::config("fetch", format!("HTTP client: {e}")))?;
        Ok(FetchService {
            client,
            allow,
            max_bytes: config.max_response_bytes,
            timeout: Duration::from_millis(config.timeout_ms.max(1)),
        })
    }

    /// Why `url` may not be reached, if it may not: the rule `cxRest` and `cxLLM` share.
    pub(crate) fn refuse(&self, url: &reqwest::Url) -> Option<String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Some(format!(
                "only http and https URLs are allowed, not {}:",
                url.scheme()
            ));
        }
        if is_allowed(&self.allow, url) {
            return None;
        }
        let host = url.host_str().unwrap_or("");
        let port = url.port_or_known_default().unwrap_or(0);
        Some(format!(
            "host '{host}:{port}' is not in [fetch] allow in callforge.toml"
        ))
    }

    /// The client (its redirects follow only allowed hosts), the body cap and the timeout.
    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub(crate) fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    fn request(self: &Arc<Self>, args: Vec<Json>) -> HostCall {
        let url = match args.first() {
            Some(Json::String(u)) => u.clone(),
            _ => return HostCall::Ready(Err(fetch_error("the URL must be a string"))),
        };
        let init = match args.get(1) {
            None | Some(Json::Null) => serde_json::Map::new(),
            Some(Json::Object(o)) => o.clone(),
            Some(_) => return HostCall::Ready(Err(fetch_error("options must be an object"))),
        };
        let parsed = match reqwest::Url::parse(&url) {
            Ok(u) => u,
            Err(e) => {
                return HostCall::Ready(Err(fetch_error(format!("invalid URL '{url}': {e}"))))
            }
        };
        if !matches!(parsed.scheme(), "http" | "https") {
            return HostCall::Ready(Err(fetch_error(format!(
                "only http and https URLs are allowed, not {}:",
                parsed.scheme()
            ))));
        }
        if !is_allowed(&self.allow, &parsed) {
            let host = parsed.host_str().unwrap_or("");
            let port = parsed.port_or_known_default().unwrap_or(0);
            return HostCall::Ready(Err(fetch_error(format!(
                "host '{host}:{port}' is not in [fetch] allow in callforge.toml"
            ))));
        }
        let method = init
            .get("method")
            .and_then(Json::as_str)
            .unwrap_or("GET")
            .to_ascii_uppercase();
        let method = match reqwest::Method::from_bytes(method.as_bytes()) {
            Ok(m) => m,
            Err(_) => {
                return HostCall::Ready(Err(fetch_error(format!("invalid method '{method}'"))))
            }
        };
        let timeout = match init.get("timeout").and_then(Json::as_f64) {
            Some(ms) if ms.is_finite() && ms > 0.0 => {
                Duration::from_millis(ms.min(self.timeout.as_millis() as f64) as u64)
                    .max(Duration::from_millis(1))
            }
            _ => self.timeout,
        };
        let mut request = self.client.request(method, parsed.clone()).timeout(timeout);
        let mut has_content_type = false;
        if let Some(Json::Object(headers)) = init.get("headers") {
            for (k, v) in headers {
                let value = match v {
                    Json::String(s) => s.clone(),
                    other => other.to_string(),
                };
                has_content_type |= k.eq_ignore_ascii_case("content-type");
                request = request.header(k.as_str(), value);
            }
        }
        match init.get("body") {
            None | Some(Json::Null) => {}
            Some(Json::String(s)) => request = request.body(s.clone()),
            Some(other) => {
                if !has_content_type {
                    request = request.header("content-type", "application/json");
                }
                request = request.body(other.to_string());
            }
        }
        let max = self.max_bytes;
        let requested = parsed.to_string();
        HostCall::Pending(Box::pin(async move {
            let timed_out =
                || fetch_error(format!("{url} timed out after {} ms", timeout.as_millis()));
            let work = async {
                let response = request.send().await.map_err(|e| {
                    if e.is_timeout() {
                        timed_out()
                    } else {
                        fetch_error(format!("{url}: {}", error_chain(&e)))
                    }
                })?;
                let status = response.status();
                let final_url = response.url().to_string();
                let headers: Vec<Json> = response
                    .headers()
                    .iter()
                    .map(|(k, v)| json!([k.as_str(), String::from_utf8_lossy(v.as_bytes())]))
                    .collect();
                let body = read_capped(response, max)
                    .await
                    .map_err(|e| fetch_error(format!("{url}: {e}")))?;
                Ok(json!({
                    "status": status.as_u16(),
                    "statusText": status.canonical_reason().unwrap_or(""),
                    "url": final_url,
                    "redirected": final_url != requested,
                    "headers": headers,
                    "body": String::from_utf8_lossy(&body),
                }))
            };
            tokio::time::timeout(timeout, work)
                .await
                .map_err(|_| timed_out())?
        }))
    }
}

/// An error with its sources, which is where reqwest says what actually failed.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The global `fetch`.
pub struct FetchModule {
    service: Arc<FetchService>,
}

impl FetchModule {
    pub fn new(service: Arc<FetchService>) -> Self {
        FetchModule { service }
    }
}

impl HostModule for FetchModule {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(FetchObject {
            service: self.service.clone(),
        })
    }
    fn prelude(&self) -> Option<&'static str> {
        Some(PRELUDE)
    }
}

struct FetchObject {
    service: Arc<FetchService>,
}

const METHODS: &[HostMethod] = &[HostMethod::asynchronous("request")];

impl HostObject for FetchObject {
    fn methods(&self) -> &[HostMethod] {
        METHODS
    }
    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        match method {
            "request" => self.service.request(args),
            other => HostCall::Ready(Err(HostError::type_error(format!(
                "fetch has no method '{other}'"
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_entries_match_host_and_optional_port() {
        let allow = vec![
            parse_allowed("127.0.0.1:8080").unwrap(),
            parse_allowed("API.example.com").unwrap(),
            parse_allowed("[::1]:9000").unwrap(),
        ];
        let ok = |u: &str| is_allowed(&allow, &reqwest::Url::parse(u).unwrap());
        assert!(ok("http://127.0.0.1:8080/x"));
        assert!(!ok("http://127.0.0.1:8081/x"));
        assert!(ok("https://api.example.com/v1"));
        assert!(ok("http://api.example.com:81/v1"));
        assert!(ok("http://[::1]:9000/"));
        assert!(!ok("http://evil.example.com/"));
        assert!(parse_allowed("http://x/y").is_err());
        assert!(parse_allowed("host/path").is_err());
    }

    #[test]
    fn resolve_entries_are_a_host_name_and_a_socket_address() {
        let (host, addr) = parse_resolve("Feeds.Example.com", "127.0.0.1:8080").unwrap();
        assert_eq!(host, "feeds.example.com");
        assert_eq!(addr, "127.0.0.1:8080".parse().unwrap());
        assert!(parse_resolve("a.example.com", "[::1]:80").is_ok());
        assert!(parse_resolve("a.example.com", "localhost:80").is_err());
        assert!(parse_resolve("a.example.com", "127.0.0.1").is_err());
        assert!(parse_resolve("a.example.com:80", "127.0.0.1:80").is_err());
        let mut config = FetchConfig::default();
        config
            .resolve
            .insert("x.example.com".into(), "nowhere".into());
        let e = FetchService::new(&config).err().unwrap().to_string();
        assert!(e.contains("[fetch]: resolve: x.example.com"), "{e}");
    }

    #[test]
    fn the_prelude_compiles() {
        crate::script::compile("prelude", PRELUDE).unwrap();
    }
}
