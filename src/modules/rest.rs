//! `require('cxRest')` (alias `rest`): `auth(user)` gives an API object whose `get(path,
//! query)`, `post`, `put`, `patch`, `delete` and the stub's `create`/`read`/`update` helpers call
//! the operator's REST API (`[rest] url`, ConnexCS's control-panel API by default) with the
//! credentials `[rest.users."user"]` holds. Scripts never see the credentials.
//!
//! The requests follow `fetch`'s rules: the host must be in `[fetch] allow`, and its timeout
//! and response size cap apply. Failures reject with a `RestError`.

use std::{collections::BTreeMap, sync::Arc};

use serde_json::{Map, Value as Json};

use super::{
    fetch::{error_chain, read_capped, FetchService},
    ModuleError,
};
use crate::{
    config::{RestConfig, RestUser},
    script::{HostCall, HostError, HostMethod, HostModule, HostObject},
};

/// `auth` is the module itself (`require('cxRest')("user")`, `import auth from 'cxRest'`) and
/// also its property (`require('cxRest').auth("user")`), as ConnexCS's scripts use both.
const PRELUDE: &str = r#"(function (raw) {
  const join = (area, key) =>
    key === undefined || key === null ? area : String(area).replace(/\/+$/, "") + "/" + encodeURIComponent(String(key));
  function auth(user) {
    const call = (method, path, query, body) =>
      raw.request(user === undefined ? null : user, method, path, query === undefined ? null : query, body === undefined ? null : body);
    return {
      get: (path, query) => call("GET", path, query, null),
      post: (path, body) => call("POST", path, null, body),
      put: (path, body) => call("PUT", path, null, body),
      patch: (path, body) => call("PATCH", path, null, body),
      delete: (area, key) => call("DELETE", join(area, key), null, null),
      read: (area, key) => call("GET", join(area, key), null, null),
      create: (area, key, data) =>
        data === undefined ? call("POST", area, null, key) : call("POST", join(area, key), null, data),
      update: (area, key, data) =>
        data === undefined ? call("PUT", area, null, key) : call("PUT", join(area, key), null, data),
    };
  }
  auth.auth = auth;
  return auth;
})"#;

const METHODS: &[HostMethod] = &[HostMethod::asynchronous("request")];

fn rest_error(message: impl Into<String>) -> HostError {
    HostError::new("RestError", format!("cxRest: {}", message.into()))
}

/// The base URL, the users and the shared HTTP rules.
pub struct RestService {
    base: reqwest::Url,
    users: BTreeMap<String, RestUser>,
    fetch: Arc<FetchService>,
}

impl RestService {
    /// Checks the URL now; with users configured, its host must be in `[fetch] allow`.
    pub fn new(config: &RestConfig, fetch: Arc<FetchService>) -> Result<Self, ModuleError> {
        let mut url = config.url.trim().to_string();
        if !url.ends_with('/') {
            url.push('/');
        }
        let base = reqwest::Url::parse(&url)
            .map_err(|e| ModuleError::config("rest", format!("url '{url}': {e}")))?;
        if !config.users.is_empty() {
            if let Some(why) = fetch.refuse(&base) {
                return Err(ModuleError::config("rest", format!("url '{url}': {why}")));
            }
        }
        Ok(RestService {
            base,
            users: config.users.clone(),
            fetch,
        })
    }

    /// The URL of `path` (relative to the base) with `query`; it must stay below the base.
    fn url(&self, path: &str, query: Option<&Map<String, Json>>) -> Result<reqwest::Url, String> {
        let relative = path.trim_start_matches('/');
        if relative.contains("://") || relative.split(['/', '?']).any(|s| s == "..") {
            return Err(format!(
                "path '{path}' must be relative to the API, without '..'"
            ));
        }
        let mut url = self
            .base
            .join(relative)
            .map_err(|e| format!("path '{path}': {e}"))?;
        if !url.as_str().starts_with(self.base.as_str()) {
            return Err(format!("path '{path}' leaves the API's base URL"));
        }
        if let Some(query) = query {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in query {
                let values = match v {
                    Json::Array(items) => items.clone(),
                    Json::Null => Vec::new(),
                    other => vec![other.clone()],
                };
                for v in values {
                    let text = match v {
                        Json::String(s) => s,
                        other => other.to_string(),
                    };
                    pairs.append_pair(k, &text);
                }
            }
        }
        Ok(url)
    }

    fn request(&self, args: Vec<Json>) -> HostCall {
        let user = match args.first() {
            Some(Json::String(u)) => u.clone(),
            _ => {
                return HostCall::Ready(Err(HostError::type_error(
                    "cxRest.auth(user): user must be a string naming an API user",
                )))
            }
        };
        let method = args.get(1).and_then(Json::as_str).unwrap_or("GET");
        let path = match args.get(2) {
            Some(Json::String(p)) => p.clone(),
            Some(Json::Number(n)) => n.to_string(),
            _ => {
                return HostCall::Ready(Err(HostError::type_error(format!(
                    "cxRest.{}: the path must be a string",
                    method.to_ascii_lowercase()
                ))))
            }
        };
        let query = match args.get(3) {
            None | Some(Json::Null) => None,
            Some(Json::Object(q)) => Some(q),
            Some(_) => {
                return HostCall::Ready(Err(HostError::type_error(
                    "cxRest.get: the query must be an object",
                )))
            }
        };
        let Some(creds) = self.users.get(&user) else {
            return HostCall::Ready(Err(rest_error(format!(
                "API user '{user}' is not configured: add [rest.users.\"{user}\"] to callforge.toml"
            ))));
        };
        let url = match self.url(&path, query) {
            Ok(u) => u,
            Err(e) => return HostCall::Ready(Err(rest_error(e))),
        };
        let http_method = match reqwest::Method::from_bytes(method.as_bytes()) {
            Ok(m) => m,
            Err(_) => return HostCall::Ready(Err(rest_error(format!("bad method '{method}'")))),
        };
        let timeout = self.fetch.timeout();
        let mut request = self
            .fetch
            .client()
            .request(http_method, url)
            .timeout(timeout)
            .header("accept", "application/json");
        request = match (&creds.token, &creds.password) {
            (Some(token), _) => request.bearer_auth(token),
            (None, password) => request.basic_auth(
                creds.username.clone().unwrap_or_else(|| user.clone()),
                password.clone(),
            ),
        };
        match args.get(4) {
            None | Some(Json::Null) => {}
            Some(body) => {
                request = request
                    .header("content-type", "application/json")
                    .body(body.to_string())
            }
        }
        let what = format!("{method} {path}");
        let max = self.fetch.max_bytes();
        HostCall::Pending(Box::pin(async move {
            let work = send_json(request, max);
            match tokio::time::timeout(timeout, work).await {
                Err(_) => Err(rest_error(format!(
                    "{what} timed out after {} ms",
                    timeout.as_millis()
                ))),
                Ok(Err(e)) => Err(rest_error(format!("{what}: {e}"))),
                Ok(Ok((status, body))) if !(200..300).contains(&status) => {
                    let text = match &body {
                        Json::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    let short: String = text.chars().take(300).collect();
                    Err(rest_error(format!("{what}: HTTP {status}: {short}")))
                }
                Ok(Ok((_, body))) => Ok(body),
            }
        }))
    }
}

/// Send `request` and read at most `max` bytes: the status and the body as JSON (a body that
/// is not JSON comes back as a string, an empty one as `null`).
pub(crate) async fn send_json(
    request: reqwest::RequestBuilder,
    max: usize,
) -> Result<(u16, Json), String> {
    let response = request.send().await.map_err(|e| {
        if e.is_timeout() {
            "timed out".to_string()
        } else {
            error_chain(&e)
        }
    })?;
    let status = response.status().as_u16();
    let bytes = read_capped(response, max).await?;
    let body = if bytes.iter().all(u8::is_ascii_whitespace) {
        Json::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Ok((status, body))
}

/// `require('cxRest')`.
pub struct RestModule {
    service: Arc<RestService>,
}

impl RestModule {
    pub fn new(service: Arc<RestService>) -> Self {
        RestModule { service }
    }
}

impl HostModule for RestModule {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(RestObject {
            service: self.service.clone(),
        })
    }
    fn prelude(&self) -> Option<&'static str> {
        Some(PRELUDE)
    }
}

struct RestObject {
    service: Arc<RestService>,
}

impl HostObject for RestObject {
    fn methods(&self) -> &[HostMethod] {
        METHODS
    }
    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        match method {
            "request" => self.service.request(args),
            other => HostCall::Ready(Err(HostError::type_error(format!(
                "cxRest has no method '{other}'"
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FetchConfig;

    fn service(url: &str) -> RestService {
        let fetch = FetchService::new(&FetchConfig {
            allow: vec!["api.example.com".into()],
            ..FetchConfig::default()
        })
        .unwrap();
        let mut users = BTreeMap::new();
        users.insert("u".into(), RestUser::default());
        RestService::new(
            &RestConfig {
                url: url.into(),
                users,
            },
            Arc::new(fetch),
        )
        .unwrap()
    }

    #[test]
    fn paths_stay_below_the_base_url() {
        let s = service("https://api.example.com/api/cp");
        let q: Map<String, Json> =
            serde_json::from_str(r#"{"cli": "+44 1", "n": 2, "ids": [1, 2]}"#).unwrap();
        assert_eq!(
            s.url("/customer/12", Some(&q)).unwrap().as_str(),
            "https://api.example.com/api/cp/customer/12?cli=%2B44+1&ids=1&ids=2&n=2"
        );
        for bad in ["../admin", "a/../../x", "https://evil.example.com/"] {
            assert!(s.url(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_host_outside_the_allow_list_is_a_startup_error() {
        let fetch = Arc::new(FetchService::new(&FetchConfig::default()).unwrap());
        let mut users = BTreeMap::new();
        users.insert("u".into(), RestUser::default());
        let e = RestService::new(
            &RestConfig {
                url: "https://api.example.com/".into(),
                users,
            },
            fetch,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("[fetch] allow"), "{e}");
    }

    #[test]
    fn the_prelude_compiles() {
        crate::script::compile("prelude", PRELUDE).unwrap();
    }
}
