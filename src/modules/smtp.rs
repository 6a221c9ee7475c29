//! `api.send.email({to, subject, text, html})` over SMTP with lettre.

use std::time::Duration;

use lettre::{
    message::{header::ContentType, Mailbox, MultiPart, SinglePart},
    transport::smtp::{
        authentication::Credentials,
        client::{Tls, TlsParameters},
    },
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
};
use serde_json::{Map, Value as Json};

use super::{send::Attempt, ModuleError};
use crate::config::{SmtpConfig, SmtpTls};

/// A configured SMTP relay.
pub struct SmtpSender {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl SmtpSender {
    pub fn new(config: &SmtpConfig) -> Result<Self, ModuleError> {
        let key = "send.smtp";
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|e| ModuleError::config(key, format!("from = \"{}\": {e}", config.from)))?;
        let tls_params = || {
            TlsParameters::new(config.server.clone())
                .map_err(|e| ModuleError::config(key, format!("TLS for {}: {e}", config.server)))
        };
        let (tls, default_port) = match config.tls {
            SmtpTls::None => (Tls::None, 25),
            SmtpTls::Starttls => (Tls::Required(tls_params()?), 587),
            SmtpTls::Tls => (Tls::Wrapper(tls_params()?), 465),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.server)
            .port(config.port.unwrap_or(default_port))
            .tls(tls)
            .timeout(Some(Duration::from_millis(config.timeout_ms.max(1))));
        match (&config.username, &config.password) {
            (Some(user), Some(pass)) => {
                builder = builder.credentials(Credentials::new(user.clone(), pass.clone()))
            }
            (None, None) => {}
            _ => {
                return Err(ModuleError::config(
                    key,
                    "username and password go together",
                ))
            }
        }
        Ok(SmtpSender {
            transport: builder.build(),
            from,
        })
    }

    /// Check the script's params and build the message (errors are the script's fault).
    pub fn message(&self, params: &Map<String, Json>) -> Result<Message, String> {
        let recipients: Vec<String> = match params.get("to") {
            Some(Json::String(s)) => s.split(',').map(|s| s.trim().to_string()).collect(),
            Some(Json::Array(list)) => list
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or("to: every entry must be a string")
                })
                .collect::<Result<_, _>>()?,
            _ => return Err("to is required: an address or a list of addresses".into()),
        };
        let mut builder = Message::builder().from(self.from.clone());
        for to in recipients.iter().filter(|s| !s.is_empty()) {
            let mailbox: Mailbox = to.parse().map_err(|e| format!("to '{to}': {e}"))?;
            builder = builder.to(mailbox);
        }
        let text_of = |k: &str| params.get(k).and_then(Json::as_str).map(str::to_string);
        builder = builder.subject(text_of("subject").unwrap_or_default());
        let message = match (text_of("text"), text_of("html")) {
            (Some(text), Some(html)) => {
                builder.multipart(MultiPart::alternative_plain_html(text, html))
            }
            (None, Some(html)) => builder.singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_HTML)
                    .body(html),
            ),
            (text, None) => builder.singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_PLAIN)
                    .body(text.unwrap_or_default()),
            ),
        };
        message.map_err(|e| e.to_string())
    }

    /// One delivery attempt.
    pub async fn send(&self, message: Message) -> Attempt {
        match self.transport.send(message).await {
            Ok(response) => Attempt::Done(serde_json::json!({
                "code": response.code().to_string(),
            })),
            Err(e) if e.is_permanent() => Attempt::Fatal(format!("SMTP refused the message: {e}")),
            Err(e) => Attempt::Retry(format!("SMTP: {e}")),
        }
    }
}
