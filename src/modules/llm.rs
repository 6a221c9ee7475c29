//! `require('cxLLM')` (alias `llm`): `chat(assistant, text, chatId)` asks the operator's
//! OpenAI-compatible chat-completions API (`[llm]`) as the assistant `[llm.assistants.NAME]`
//! and resolves with the reply text. Turns with the same `chatId` share their history (kept in
//! memory, at most `max_history` messages per chat, `max_chats` chats).
//!
//! The endpoint's host must be in `[fetch] allow`; fetch's response cap applies. Failures
//! reject with an `LLMError`.

use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::Duration,
};

use lru::LruCache;
use serde_json::{json, Value as Json};

use super::{args, fetch::FetchService, rest::send_json, ModuleError};
use crate::{
    config::LlmConfig,
    script::{HostCall, HostError, HostMethod, HostModule, HostObject},
};

fn llm_error(message: impl Into<String>) -> HostError {
    HostError::new("LLMError", format!("cxLLM: {}", message.into()))
}

/// The endpoint, the assistants and the conversations in memory.
pub struct LlmService {
    config: LlmConfig,
    url: Option<reqwest::Url>,
    fetch: Arc<FetchService>,
    /// (assistant, chatId) → the messages so far.
    chats: Mutex<LruCache<(String, String), Vec<Json>>>,
}

impl LlmService {
    pub fn new(config: &LlmConfig, fetch: Arc<FetchService>) -> Result<Self, ModuleError> {
        let url = if config.url.trim().is_empty() {
            None
        } else {
            let base = config.url.trim().trim_end_matches('/');
            let url = reqwest::Url::parse(&format!("{base}/chat/completions"))
                .map_err(|e| ModuleError::config("llm", format!("url '{base}': {e}")))?;
            if let Some(why) = fetch.refuse(&url) {
                return Err(ModuleError::config("llm", format!("url '{base}': {why}")));
            }
            Some(url)
        };
        let chats = NonZeroUsize::new(config.max_chats.max(1)).unwrap_or(NonZeroUsize::MIN);
        Ok(LlmService {
            config: config.clone(),
            url,
            fetch,
            chats: Mutex::new(LruCache::new(chats)),
        })
    }

    fn chat(self: &Arc<Self>, args: Vec<Json>) -> HostCall {
        let started = (|| -> Result<_, HostError> {
            let assistant = args::string("cxLLM.chat", &args, 0, "assistant")?;
            let text = args::string("cxLLM.chat", &args, 1, "text")?;
            let chat_id = args::opt_string("cxLLM.chat", &args, 2, "chatId")?;
            let Some(url) = self.url.clone() else {
                return Err(llm_error(
                    "no endpoint is configured: set [llm] url in callforge.toml",
                ));
            };
            let Some(settings) = self.config.assistants.get(&assistant) else {
                return Err(llm_error(format!(
                    "no assistant '{assistant}': add [llm.assistants.{assistant}] to callforge.toml"
                )));
            };
            let mut messages = Vec::new();
            if let Some(system) = &settings.system {
                messages.push(json!({"role": "system", "content": system}));
            }
            let key = chat_id.map(|id| (assistant.clone(), id));
            if let Some(key) = &key {
                let mut chats = self.chats.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(history) = chats.get(key) {
                    messages.extend(history.iter().cloned());
                }
            }
            let user = json!({"role": "user", "content": text});
            messages.push(user.clone());
            let mut body = json!({
                "model": settings.model.as_deref().unwrap_or(&self.config.model),
                "messages": messages,
            });
            if let Some(t) = settings.temperature {
                body["temperature"] = json!(t);
            }
            Ok((url, body, key, user))
        })();
        let (url, body, key, user) = match started {
            Ok(s) => s,
            Err(e) => return HostCall::Ready(Err(e)),
        };
        let timeout = Duration::from_millis(self.config.timeout_ms.max(1));
        let mut request = self
            .fetch
            .client()
            .post(url)
            .timeout(timeout)
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let max = self.fetch.max_bytes();
        let me = self.clone();
        HostCall::Pending(Box::pin(async move {
            let (status, answer) = tokio::time::timeout(timeout, send_json(request, max))
                .await
                .map_err(|_| llm_error(format!("no answer within {} ms", timeout.as_millis())))?
                .map_err(llm_error)?;
            if !(200..300).contains(&status) {
                let text: String = answer.to_string().chars().take(300).collect();
                return Err(llm_error(format!(
                    "the endpoint answered HTTP {status}: {text}"
                )));
            }
            let reply = answer
                .pointer("/choices/0/message/content")
                .and_then(Json::as_str)
                .ok_or_else(|| llm_error("the answer has no choices[0].message.content"))?
                .to_string();
            if let Some(key) = key {
                let mut chats = me.chats.lock().unwrap_or_else(|p| p.into_inner());
                let history = chats.get_or_insert_mut(key, Vec::new);
                history.push(user);
                history.push(json!({"role": "assistant", "content": reply}));
                let excess = history.len().saturating_sub(me.config.max_history);
                history.drain(..excess);
            }
            Ok(Json::String(reply))
        }))
    }
}

const METHODS: &[HostMethod] = &[HostMethod::asynchronous("chat")];

/// `require('cxLLM')`.
pub struct LlmModule {
    service: Arc<LlmService>,
}

impl LlmModule {
    pub fn new(service: Arc<LlmService>) -> Self {
        LlmModule { service }
    }
}

impl HostModule for LlmModule {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(LlmObject {
            service: self.service.clone(),
        })
    }
}

struct LlmObject {
    service: Arc<LlmService>,
}

impl HostObject for LlmObject {
    fn methods(&self) -> &[HostMethod] {
        METHODS
    }
    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        match method {
            "chat" => self.service.chat(args),
            other => HostCall::Ready(Err(HostError::type_error(format!(
                "cxLLM has no method '{other}'"
            )))),
        }
    }
}
