//! `api.send.sms(params)` / `api.send.notify(params)`: an HTTP webhook whose JSON body is the
//! configured template with `{{name}}` placeholders filled from the params.

use std::{collections::BTreeMap, time::Duration};

use serde_json::{Map, Value as Json};

use super::{fetch::read_capped, send::Attempt, ModuleError};
use crate::config::WebhookConfig;

/// A configured webhook.
pub struct Webhook {
    client: reqwest::Client,
    url: String,
    method: reqwest::Method,
    auth_header: Option<String>,
    headers: BTreeMap<String, String>,
    template: Option<Json>,
    timeout: Duration,
}

/// Fill `{{name}}` placeholders: a string that is exactly one placeholder takes the param's
/// JSON value; placeholders inside longer strings are replaced by the param's text.
pub fn fill(template: &Json, params: &Map<String, Json>) -> Json {
    match template {
        Json::String(s) => {
            let trimmed = s.trim();
            if let Some(name) = trimmed
                .strip_prefix("{{")
                .and_then(|r| r.strip_suffix("}}"))
            {
                if !name.contains("{{") {
                    return params.get(name.trim()).cloned().unwrap_or(Json::Null);
                }
            }
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("{{") {
                let Some(end) = rest[start..].find("}}") else {
                    break;
                };
                out.push_str(&rest[..start]);
                let name = rest[start + 2..start + end].trim();
                match params.get(name) {
                    Some(Json::String(v)) => out.push_str(v),
                    Some(Json::Null) | None => {}
                    Some(other) => out.push_str(&other.to_string()),
                }
                rest = &rest[start + end + 2..];
            }
            out.push_str(rest);
            Json::String(out)
        }
        Json::Array(items) => Json::Array(items.iter().map(|i| fill(i, params)).collect()),
        Json::Object(fields) => Json::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), fill(v, params)))
                .collect(),
        ),
        other => other.clone(),
    }
}

impl Webhook {
    pub fn new(key: &str, config: &WebhookConfig) -> Result<Self, ModuleError> {
        let url = reqwest::Url::parse(&config.url)
            .map_err(|e| ModuleError::config(key, format!("url {}: {e}", config.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ModuleError::config(key, "url must be http:// or https://"));
        }
        let method = reqwest::Method::from_bytes(config.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| ModuleError::config(key, format!("method {}", config.method)))?;
        let template = match &config.template {
            None => None,
            Some(text) => Some(
                serde_json::from_str(text)
                    .map_err(|e| ModuleError::config(key, format!("template is not JSON: {e}")))?,
            ),
        };
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ModuleError::config(key, format!("HTTP client: {e}")))?;
        Ok(Webhook {
            client,
            url: config.url.clone(),
            method,
            auth_header: config.auth_header.clone(),
            headers: config.headers.clone(),
            template,
            timeout: Duration::from_millis(config.timeout_ms.max(1)),
        })
    }

    pub fn body(&self, params: &Map<String, Json>) -> Json {
        match &self.template {
            Some(t) => fill(t, params),
            None => Json::Object(params.clone()),
        }
    }

    /// One delivery attempt: 2xx is done, 4xx (but 408/429) is fatal, the rest is retried.
    pub async fn send(&self, body: &Json) -> Attempt {
        let mut request = self
            .client
            .request(self.method.clone(), &self.url)
            .timeout(self.timeout)
            .json(body);
        if let Some(auth) = &self.auth_header {
            request = request.header("authorization", auth);
        }
        for (k, v) in &self.headers {
            request = request.header(k, v);
        }
        let work = async {
            let response = match request.send().await {
                Ok(r) => r,
                Err(e) if e.is_timeout() => {
                    return Attempt::Retry(format!(
                        "{} timed out after {} ms",
                        self.url,
                        self.timeout.as_millis()
                    ))
                }
                Err(e) => return Attempt::Retry(format!("{}: {e}", self.url)),
            };
            let status = response.status();
            let body = read_capped(response, 64 * 1024).await.unwrap_or_default();
            let reply = serde_json::from_slice::<Json>(&body)
                .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&body).into_owned()));
            if status.is_success() {
                Attempt::Done(serde_json::json!({"status": status.as_u16(), "response": reply}))
            } else if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
                Attempt::Fatal(format!("{} answered {}", self.url, status.as_u16()))
            } else {
                Attempt::Retry(format!("{} answered {}", self.url, status.as_u16()))
            }
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(a) => a,
            Err(_) => Attempt::Retry(format!(
                "{} timed out after {} ms",
                self.url,
                self.timeout.as_millis()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_whole_values_and_inline_text() {
        let t: Json = serde_json::from_str(
            r#"{"to": "{{to}}", "msg": "Hi {{name}}, code {{code}}{{missing}}", "n": "{{n}}", "fixed": [1, "{{to}}"]}"#,
        )
        .unwrap();
        let params = serde_json::json!({"to": "+44", "name": "Ada", "code": 42, "n": 7});
        let filled = fill(&t, params.as_object().unwrap());
        assert_eq!(
            filled,
            serde_json::json!({"to": "+44", "msg": "Hi Ada, code 42", "n": 7, "fixed": [1, "+44"]})
        );
    }
}
