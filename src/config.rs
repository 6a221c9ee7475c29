//! `callforge.toml`: every section optional, every field defaulted, unknown keys refused.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    script::{LibraryLimits, Limits},
    store::Synchronous,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub scripts: ScriptsConfig,
    pub limits: LimitsConfig,
    /// Prompts, recordings, text to speech (`[media]`).
    pub media: MediaConfig,
    /// SIP listeners and stack knobs (`[sip]`).
    pub sip: SipConfig,
    /// `[[route]]` tables: which script answers which INVITE, first match wins.
    pub route: Vec<RouteConfig>,
    /// `[gateways]`: gateway id → SIP URI, for Class 4 redirect Contacts.
    pub gateways: BTreeMap<String, String>,
    pub store: StoreConfig,
    pub kv: KvConfig,
    pub records: RecordsConfig,
    /// `[lookup.NAME]`: the provider behind `api.lookup.NAME`.
    pub lookup: BTreeMap<String, LookupConfig>,
    pub send: SendConfig,
    pub fetch: FetchConfig,
    /// `[[trunk]]`: where outbound legs (bridge, transfer, originate) are sent.
    pub trunk: Vec<TrunkConfig>,
    /// `[calls]`: per-call limits of class5 calls and their outbound legs.
    pub calls: CallsConfig,
    /// `[rest]`: the REST API `cxRest` calls, with credentials per API user.
    pub rest: RestConfig,
    /// `[templates]`: the folder `cxTemplate` and `cxSend` templates come from.
    pub templates: TemplatesConfig,
    /// `[llm]`: the OpenAI-compatible endpoint behind `cxLLM`.
    pub llm: LlmConfig,
    /// `[jobs]`: the `cxJob` queue's runner.
    pub jobs: JobsConfig,
    /// `[env]`: operator variables every script sees in `process.env` (text, numbers and
    /// booleans; numbers and booleans become their text).
    pub env: BTreeMap<String, toml::Value>,
    /// The folder relative paths in the file are resolved against (the file's own folder).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[store]`: the embedded SQLite database (kv, userspace tables, records), or with `url`
/// a shared PostgreSQL database for userspace tables and records.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Relative to the configuration file's folder.
    pub path: PathBuf,
    /// `"normal"` survives a process crash; `"full"` also a power loss (an fsync per write,
    /// and per spooled record with PostgreSQL).
    pub synchronous: Synchronous,
    /// `postgres://user:password@host:port/db`: userspace, execution records and CDRs go
    /// there instead of the SQLite file.
    pub url: Option<String>,
    /// PostgreSQL only: records waiting in memory while the database is unreachable.
    pub queue_memory: usize,
    /// PostgreSQL only: where records beyond `queue_memory` wait (relative to the config's folder).
    pub spool: PathBuf,
    /// PostgreSQL only: this engine's name in the `node` column (default: the host name).
    pub node: Option<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("callforge.db"),
            synchronous: Synchronous::Normal,
            url: None,
            queue_memory: 10_000,
            spool: PathBuf::from("callforge-spool"),
            node: None,
        }
    }
}

/// `[kv]`: `backend = "embedded"` (the store) or a `redis://` URL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvConfig {
    pub backend: String,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            backend: "embedded".into(),
        }
    }
}

/// `[records]`: execution records and CDRs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordsConfig {
    pub enabled: bool,
    /// Also append every record to this JSON-lines file (relative to the config's folder).
    pub jsonl: Option<PathBuf>,
}

impl Default for RecordsConfig {
    fn default() -> Self {
        RecordsConfig {
            enabled: true,
            jsonl: None,
        }
    }
}

/// `[lookup.NAME]`: where `api.lookup.NAME(number[, table])` gets its answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase", deny_unknown_fields)]
pub enum LookupConfig {
    /// A local table: exactly one of `csv` (first row = header), `sqlite` + `table`, or
    /// `userspace` (an area of the store). Rows are found by `key_column` (default `number`).
    Table {
        csv: Option<PathBuf>,
        sqlite: Option<PathBuf>,
        table: Option<String>,
        userspace: Option<String>,
        key_column: Option<String>,
    },
    /// An HTTP API: `url` with `{number}` (and `{table}`) placeholders, JSON answer.
    Http {
        url: String,
        #[serde(default = "default_get")]
        method: String,
        #[serde(default = "default_lookup_timeout")]
        timeout_ms: u64,
        /// Sent as the `Authorization` header.
        auth_header: Option<String>,
        #[serde(default)]
        headers: BTreeMap<String, String>,
        /// How long answers are cached; 0 disables the cache.
        #[serde(default = "default_cache_ttl")]
        cache_ttl_s: u64,
    },
}

fn default_get() -> String {
    "GET".into()
}
fn default_lookup_timeout() -> u64 {
    3_000
}
fn default_cache_ttl() -> u64 {
    60
}

/// `[send]`: retry policy shared by every channel, and each channel's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SendConfig {
    /// Attempts after the first one.
    pub retries: u32,
    /// Delay before the first retry; doubled for each next one.
    pub backoff_ms: u64,
    /// Sends in progress at once; more wait in the queue.
    pub max_in_flight: usize,
    pub smtp: Option<SmtpConfig>,
    pub sms: Option<WebhookConfig>,
    pub notify: Option<WebhookConfig>,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            retries: 3,
            backoff_ms: 500,
            max_in_flight: 32,
            smtp: None,
            sms: None,
            notify: None,
        }
    }
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    None,
    Starttls,
    Tls,
}

/// `[send.smtp]`: the relay `api.send.email` uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    pub server: String,
    pub port: Option<u16>,
    pub tls: SmtpTls,
    pub username: Option<String>,
    pub password: Option<String>,
    pub from: String,
    #[serde(default = "default_send_timeout")]
    pub timeout_ms: u64,
}

/// `[send.sms]` / `[send.notify]`: an HTTP webhook. `template` is JSON text whose `{{name}}`
/// placeholders are filled from the script's params; without one, the params are sent as-is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    #[serde(default = "default_post")]
    pub method: String,
    pub auth_header: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub template: Option<String>,
    #[serde(default = "default_send_timeout")]
    pub timeout_ms: u64,
}

fn default_post() -> String {
    "POST".into()
}
fn default_send_timeout() -> u64 {
    10_000
}

/// `[fetch]`: the hosts `fetch()` may reach and how much it may read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    /// `host` or `host:port` entries; everything else is refused.
    pub allow: Vec<String>,
    pub max_response_bytes: usize,
    pub timeout_ms: u64,
    /// Host name → `IP:port` to connect to instead of resolving it (like curl's `--resolve`),
    /// for `fetch`, `cxRest`, `cxLLM` and `rss-parser`. The allow-list still applies to the name.
    pub resolve: BTreeMap<String, String>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            allow: Vec::new(),
            max_response_bytes: 1024 * 1024,
            timeout_ms: 10_000,
            resolve: BTreeMap::new(),
        }
    }
}

/// `[media]`: where prompts and recordings live, and how text is spoken.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Prompts folder: `ctx.play("ivr/menu.wav")` resolves inside it.
    pub dir: PathBuf,
    /// Recordings folder (inside `dir` by default, so `play(rec.file)` works).
    pub recordings: PathBuf,
    /// Decoded prompts kept in memory, in MiB.
    pub prompt_cache_mb: usize,
    /// Rendered TTS phrases kept in memory, in MiB.
    pub tts_cache_mb: usize,
    /// The espeak-ng program, or an `http(s)://` URL template of a TTS service with
    /// `{text}` and `{voice}` placeholders that answers with a WAV file.
    pub tts: String,
    /// Default TTS voice.
    pub voice: String,
    /// Detect in-band DTMF tones even when the caller negotiated telephone-event.
    pub inband_dtmf: bool,
    /// Hosts (`host` or `host:port`) that `ctx.play("https://...")` may fetch from.
    pub url_hosts: Vec<String>,
    /// Connect and total timeouts of those fetches (and of an HTTP TTS service), in ms.
    pub url_connect_timeout_ms: u64,
    pub url_timeout_ms: u64,
    /// Threads that run bridged calls' RTP relays, apart from the tokio workers (0: relays
    /// run on the workers).
    pub relay_threads: usize,
    /// Scheduling of those threads: `normal`, `high` (nice -10) or `realtime` (SCHED_FIFO),
    /// each where the process may.
    pub relay_priority: crate::media::RelayPriority,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            dir: PathBuf::from("media"),
            recordings: PathBuf::from("media/recordings"),
            prompt_cache_mb: 64,
            tts_cache_mb: 32,
            tts: "espeak-ng".into(),
            voice: "en".into(),
            inband_dtmf: false,
            url_hosts: Vec::new(),
            url_connect_timeout_ms: 2_000,
            url_timeout_ms: 10_000,
            relay_threads: 1,
            relay_priority: crate::media::RelayPriority::Realtime,
        }
    }
}

/// `[sip]`: where SIP listens and the stack's limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SipConfig {
    /// Listen specs, `udp:IP:PORT` / `tcp:IP:PORT`; `serve --sip` replaces the list.
    pub listen: Vec<String>,
    /// Start SIP at all (`false` serves HTTP only).
    pub enabled: bool,
    /// RFC 3261 T1 in milliseconds: paces our retransmissions, and 64*T1 is how long we
    /// wait for answers. What we remember of the peer's requests (absorbing its
    /// retransmissions, crossed BYEs) lasts 64 x max(T1, 500 ms), as the peer's T1 is its own.
    pub t1_ms: u64,
    pub max_calls: usize,
    pub max_transactions: usize,
    /// Largest SIP message accepted, in bytes.
    pub max_message_bytes: usize,
    /// A Class 5 INVITE the script neither answers nor rejects in this time gets 408.
    pub pending_timeout_s: u64,
    /// Codec preference for answers, best first: "PCMU", "PCMA".
    pub codecs: Vec<String>,
    /// Address written in SDP and bound for RTP; default: the first listener's IP.
    pub rtp_ip: Option<IpAddr>,
    /// RTP port range (inclusive), even ports are used.
    pub rtp_ports: [u16; 2],
    /// Sources (IP or CIDR) whose new requests every listener accepts; empty accepts all.
    pub allow: Vec<String>,
    /// Listeners with their own source list, by listen spec as written in `listen`
    /// (`"udp:0.0.0.0:5060" = ["192.0.2.0/24"]`); used instead of `allow` on that listener.
    pub listener_allow: BTreeMap<String, Vec<String>>,
    /// What refused sources get: `"reject"` (403) or `"drop"` (no answer).
    pub deny_action: crate::sip::guard::DenyAction,
    /// New out-of-dialog requests per second per source IP (0 = no limit).
    pub rate_per_source: u32,
    /// Calls in progress per source IP (0 = no limit).
    pub calls_per_source: u32,
    /// What sources over a limit get: `"reject"` (503 + Retry-After) or `"drop"`.
    pub limit_action: crate::sip::guard::DenyAction,
    /// Realm of the Digest challenges sent to callers.
    pub realm: String,
    /// How long a Digest nonce we issued stays valid, in seconds.
    pub nonce_ttl_s: u64,
    /// `[[sip.user]]`: accounts that routes with `auth = true` accept.
    pub user: Vec<SipUser>,
    /// Serve a non-loopback listener with a class5 route that has neither ACL nor auth.
    pub insecure_open: bool,
    /// SIP over TCP: a connection silent both ways this long is closed.
    pub tcp_idle_timeout_s: u64,
    /// SIP over TCP: a message begun (or a new connection's first) must be complete in this time.
    pub tcp_message_timeout_s: u64,
    /// SIP over TCP: connections held at once per listener (at the cap, the longest idle is closed).
    pub tcp_max_connections: usize,
    /// SIP over TCP: connections one source IP may hold.
    pub tcp_max_per_source: usize,
    /// New INVITEs get 503 (Retry-After) while every script worker that would run them is
    /// this late starting new work, in ms; 0 never sheds.
    pub shed_lag_ms: u64,
    /// Class4 fast path: each routing worker reads the UDP listeners itself (`SO_REUSEPORT`)
    /// and answers class4 INVITEs without a thread hop; everything else goes to the stack.
    pub fast_path: bool,
}

/// One `[[sip.user]]`: a caller account for Digest authentication.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SipUser {
    pub name: String,
    pub password: String,
}

impl Default for SipConfig {
    fn default() -> Self {
        SipConfig {
            listen: vec!["udp:127.0.0.1:5060".into(), "tcp:127.0.0.1:5060".into()],
            enabled: true,
            t1_ms: 500,
            max_calls: 10_000,
            max_transactions: 50_000,
            max_message_bytes: 65_535,
            pending_timeout_s: 180,
            codecs: vec!["PCMU".into(), "PCMA".into()],
            rtp_ip: None,
            rtp_ports: [16_384, 32_767],
            allow: Vec::new(),
            listener_allow: BTreeMap::new(),
            deny_action: Default::default(),
            rate_per_source: 0,
            calls_per_source: 0,
            limit_action: Default::default(),
            realm: "callforge".into(),
            nonce_ttl_s: 300,
            user: Vec::new(),
            insecure_open: false,
            tcp_idle_timeout_s: 300,
            tcp_message_timeout_s: 10,
            tcp_max_connections: 4096,
            tcp_max_per_source: 64,
            shed_lag_ms: 500,
            fast_path: true,
        }
    }
}

/// One `[[trunk]]`: a carrier or PBX that outbound legs are sent to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrunkConfig {
    /// Used in destinations as `name:number` and in the originate API's `trunk`.
    pub name: String,
    /// Next hop: `sip:HOST[:PORT]` or `HOST:PORT`; HOST must be an IP address (no DNS).
    pub uri: String,
    /// `udp` (default) or `tcp`.
    #[serde(default = "default_udp")]
    pub transport: String,
    /// Digest credentials answered to 401/407 challenges.
    pub username: Option<String>,
    pub password: Option<String>,
    /// Caller ID used when the script or API gives none.
    pub caller_id: Option<String>,
    /// Always send `caller_id`, whatever the script asks for.
    #[serde(default)]
    pub force_caller_id: bool,
    /// Prepended to dialled numbers (after `strip_plus`).
    #[serde(default)]
    pub prefix: String,
    /// Remove a leading `+` from dialled numbers and caller IDs.
    #[serde(default)]
    pub strip_plus: bool,
    /// Codec preference offered on this trunk, best first (default: `[sip] codecs`).
    pub codecs: Option<Vec<String>>,
    /// Concurrent outbound calls allowed on this trunk (0 = no limit).
    #[serde(default)]
    pub max_calls: usize,
    /// The trunk plain numbers go out through (default: the first trunk).
    #[serde(default)]
    pub default: bool,
}

fn default_udp() -> String {
    "udp".into()
}

/// `[calls]`: limits every class5 call is held to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// A call still up after this many seconds is hung up (0 = no limit).
    pub max_duration_s: u64,
    /// `ctx.bridge`/`ctx.transfer` attempts one call may make.
    pub max_bridge_attempts: u32,
    /// Default ring timeout of `ctx.bridge` and originated calls, in seconds.
    pub ring_timeout_s: u64,
    /// Incoming REFER from the caller: `false` answers 603 Decline.
    pub accept_refer: bool,
    /// Draining (SIGTERM, `POST /v1/admin/drain`): calls still up after this many seconds
    /// get a BYE, then the process exits.
    pub drain_timeout_s: u64,
    /// How long a script may go on after its call ended (post-call work: a webhook, kv);
    /// a run still waiting after that is stopped and the CDR written.
    pub after_hangup_s: u64,
}

impl Default for CallsConfig {
    fn default() -> Self {
        CallsConfig {
            max_duration_s: 4 * 3600,
            max_bridge_attempts: 10,
            ring_timeout_s: 60,
            accept_refer: false,
            drain_timeout_s: 300,
            after_hangup_s: 10,
        }
    }
}

/// Which interpreter mode a route runs its script in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteMode {
    Class4,
    Class5,
}

/// One `[[route]]`: INVITEs whose Request-URI user matches `match` run `script`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Regular expression on the Request-URI user (unanchored unless you anchor it).
    #[serde(rename = "match")]
    pub pattern: String,
    /// Script name in the scripts folder (`routing.js` or `routing`).
    pub script: String,
    pub mode: RouteMode,
    /// Extra vars TOML merged into `data` (relative paths are inside the scripts folder).
    pub vars: Option<PathBuf>,
    /// Class 4: the SIP status a script failure or timeout becomes (default 500).
    pub timeout_action: Option<u16>,
    /// Sources (IP or CIDR) that may use this route; others get 403 (empty: no extra check).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Require Digest credentials of a `[[sip.user]]` on INVITEs for this route.
    #[serde(default)]
    pub auth: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Bearer token required on `/v1/*` when set.
    pub token: Option<String>,
    pub max_body_bytes: usize,
    /// Serve Prometheus metrics on `/metrics`.
    pub metrics: bool,
    /// Bearer token `/metrics` requires; unset leaves it open (it holds no secrets).
    pub metrics_token: Option<String>,
    /// A request's headers must arrive within this time of its first byte (slow clients).
    pub header_timeout_s: u64,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout_s: u64,
    /// Connections one source IP may hold open.
    pub max_connections_per_source: usize,
    /// Each routing worker thread accepts and serves its own share of the connections, so
    /// a class4 run never changes threads; false serves HTTP from the main runtime.
    pub thread_per_core: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            max_body_bytes: 1024 * 1024,
            metrics: true,
            metrics_token: None,
            header_timeout_s: 10,
            idle_timeout_s: 60,
            max_connections_per_source: 256,
            thread_per_core: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScriptsConfig {
    pub dir: PathBuf,
    pub max_script_bytes: usize,
    pub max_scripts: usize,
}

impl Default for ScriptsConfig {
    fn default() -> Self {
        let lib = LibraryLimits::default();
        ScriptsConfig {
            dir: PathBuf::from("scripts"),
            max_script_bytes: lib.max_script_bytes,
            max_scripts: lib.max_scripts,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub memory_mb: usize,
    pub stack_kb: usize,
    pub script_cpu_ms: u64,
    pub app_cpu_ms: u64,
    pub wall_ms: u64,
    /// Script worker threads (HTTP runs, class5 calls); 0 = one per core.
    pub workers: usize,
    /// Worker threads of their own for class4 decisions (SIP and HTTP); 0 = one per core.
    pub class4_workers: usize,
    /// Console lines and bytes one run may log (captured and to the server log).
    pub max_log_lines: usize,
    pub max_log_bytes: usize,
    /// How much nicer (lower priority) script workers run than the SIP and RTP threads, so a
    /// busy machine paces RTP first; 0 gives them equal priority (a class4-only engine).
    pub worker_niceness: i32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = Limits::default();
        LimitsConfig {
            memory_mb: l.memory_bytes / (1024 * 1024),
            stack_kb: l.stack_bytes / 1024,
            script_cpu_ms: l.script_cpu.as_millis() as u64,
            app_cpu_ms: l.app_cpu.as_millis() as u64,
            wall_ms: l.wall.as_millis() as u64,
            workers: 0,
            class4_workers: 0,
            max_log_lines: l.max_log_lines,
            max_log_bytes: l.max_log_bytes,
            worker_niceness: 5,
        }
    }
}

impl LimitsConfig {
    pub fn to_limits(&self) -> Limits {
        Limits {
            memory_bytes: self.memory_mb.max(1) * 1024 * 1024,
            stack_bytes: self.stack_kb.max(64) * 1024,
            script_cpu: Duration::from_millis(self.script_cpu_ms.max(1)),
            app_cpu: Duration::from_millis(self.app_cpu_ms.max(1)),
            wall: Duration::from_millis(self.wall_ms.max(1)),
            max_log_lines: self.max_log_lines,
            max_log_bytes: self.max_log_bytes,
        }
    }
}

impl ScriptsConfig {
    pub fn library_limits(&self) -> LibraryLimits {
        LibraryLimits {
            max_script_bytes: self.max_script_bytes,
            max_scripts: self.max_scripts,
        }
    }
}

impl Config {
    pub fn parse(text: &str, path: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    /// What `serve` runs without a configuration file: SIP on loopback with demo routes
    /// (`scripts/demo.toml`, compiled in; its paths are relative to the working folder).
    pub fn embedded_default() -> Self {
        // The file is tested to parse (config::tests), so this cannot fail at run time.
        Self::parse(include_str!("../scripts/demo.toml"), "scripts/demo.toml").unwrap_or_default()
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Self::parse(&text, &path.display().to_string())?;
        config.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(config)
    }

    /// `path` resolved against the configuration file's folder when relative.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sip_routes_and_gateways_parse() {
        let c = Config::parse(
            "[sip]\nlisten = [\"udp:127.0.0.1:0\"]\nt1_ms = 250\n[[route]]\nmatch = \"^44\"\nscript = \"routing.js\"\nmode = \"class4\"\ntimeout_action = 503\n[[route]]\nmatch = \".\"\nscript = \"answer\"\nmode = \"class5\"\n[gateways]\nalpha = \"sip:alpha.example.net:5060\"\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.sip.listen, vec!["udp:127.0.0.1:0".to_string()]);
        assert_eq!(c.sip.t1_ms, 250);
        assert_eq!(c.route.len(), 2);
        assert_eq!(c.route[0].mode, RouteMode::Class4);
        assert_eq!(c.route[0].timeout_action, Some(503));
        assert_eq!(c.route[1].mode, RouteMode::Class5);
        assert_eq!(c.gateways["alpha"], "sip:alpha.example.net:5060");
        let e = Config::parse(
            "[[route]]\nmatch = \"x\"\nscript = \"a\"\nmode = \"class9\"\n",
            "cf.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("class9"), "{e}");
    }

    #[test]
    fn embedded_default_has_demo_routes_on_loopback() {
        let c = Config::parse(include_str!("../scripts/demo.toml"), "demo").unwrap();
        assert!(c.route.iter().any(|r| r.mode == RouteMode::Class4));
        assert!(c.route.iter().any(|r| r.script == "ivr.js"));
        assert!(c.sip.listen.iter().all(|l| l.contains("127.0.0.1")));
        assert_eq!(Config::embedded_default().route.len(), c.route.len());
    }

    #[test]
    fn empty_config_is_all_defaults() {
        let c = Config::parse("", "x").unwrap();
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.scripts.dir, PathBuf::from("scripts"));
        assert_eq!(c.limits.to_limits(), Limits::default());
        // Relay threads ask for SCHED_FIFO, as the RTP ticker's threads do: at nice -10 a
        // relay under load adds milliseconds (README, issue 15 goal 4).
        assert_eq!(
            c.media.relay_priority,
            crate::media::RelayPriority::Realtime
        );
        let c = Config::parse("[media]\nrelay_priority = \"high\"\n", "x").unwrap();
        assert_eq!(c.media.relay_priority, crate::media::RelayPriority::High);
    }

    #[test]
    fn sections_override_and_typos_are_refused() {
        let c = Config::parse(
            "[http]\nlisten = \"127.0.0.1:9000\"\ntoken = \"s3cret\"\n[limits]\nmemory_mb = 32\nworkers = 3\n",
            "x",
        )
        .unwrap();
        assert_eq!(c.http.listen.port(), 9000);
        assert_eq!(c.http.token.as_deref(), Some("s3cret"));
        assert_eq!(c.limits.to_limits().memory_bytes, 32 * 1024 * 1024);
        let e = Config::parse("[limits]\nmemroy_mb = 3\n", "cf.toml").unwrap_err();
        assert!(e.to_string().contains("memroy_mb"), "{e}");
    }

    #[test]
    fn module_sections_parse_and_typos_are_refused() {
        let c = Config::parse(
            r#"
[store]
path = "data/cf.db"
synchronous = "full"
[kv]
backend = "redis://127.0.0.1:6379/0"
[records]
jsonl = "records.jsonl"
[lookup.tps]
provider = "table"
csv = "dnc.csv"
[lookup.asrplus]
provider = "http"
url = "http://127.0.0.1:9/asr?n={number}"
cache_ttl_s = 5
[send]
retries = 1
[send.smtp]
server = "127.0.0.1"
port = 2525
tls = "none"
from = "cf@localhost"
[send.sms]
url = "http://127.0.0.1:9/sms"
template = '{"to": "{{to}}"}'
[fetch]
allow = ["127.0.0.1:8080"]
"#,
            "x",
        )
        .unwrap();
        assert_eq!(c.store.synchronous, Synchronous::Full);
        assert!(matches!(c.lookup["tps"], LookupConfig::Table { .. }));
        assert!(matches!(
            c.lookup["asrplus"],
            LookupConfig::Http {
                cache_ttl_s: 5,
                timeout_ms: 3_000,
                ..
            }
        ));
        assert_eq!(c.send.smtp.as_ref().unwrap().tls, SmtpTls::None);
        for (bad, needle) in [
            ("[lookup.tps]\nprovider = \"ftp\"\n", "ftp"),
            ("[lookup.tps]\nprovider = \"table\"\ncvs = \"x\"\n", "cvs"),
            (
                "[send.smtp]\nserver = \"h\"\ntls = \"maybe\"\nfrom = \"a\"\n",
                "maybe",
            ),
            ("[fetch]\nalow = []\n", "alow"),
            ("[store]\nsynchronous = \"off\"\n", "off"),
        ] {
            let e = Config::parse(bad, "cf.toml").unwrap_err();
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
    }
}

/// `[rest]`: the REST API behind `cxRest.auth(user)`; ConnexCS's control-panel API by default.
/// Its host must also be in `[fetch] allow` (one list of what scripts may reach).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestConfig {
    /// Base URL; script paths are resolved below it.
    pub url: String,
    /// `[rest.users."api@example.com"]`: the credentials each `auth(user)` name stands for.
    pub users: BTreeMap<String, RestUser>,
}

impl Default for RestConfig {
    fn default() -> Self {
        RestConfig {
            url: "https://app.connexcs.com/api/cp/".into(),
            users: BTreeMap::new(),
        }
    }
}

/// One REST API user: HTTP basic credentials or a bearer token.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestUser {
    /// Basic-auth user name; defaults to the name scripts pass to `auth()`.
    pub username: Option<String>,
    pub password: Option<String>,
    /// Sent as `Authorization: Bearer <token>` instead of basic auth.
    pub token: Option<String>,
}

/// `[templates]`: `NAME.toml` files with `subject`, `text`, `html` and `sms` parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplatesConfig {
    /// Relative to the configuration file's folder.
    pub dir: PathBuf,
}

impl Default for TemplatesConfig {
    fn default() -> Self {
        TemplatesConfig {
            dir: PathBuf::from("templates"),
        }
    }
}

/// `[llm]`: an OpenAI-compatible chat-completions API and the assistants scripts may use.
/// Its host must also be in `[fetch] allow`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// Base URL, e.g. `https://api.openai.com/v1`; `/chat/completions` is appended. Empty: off.
    pub url: String,
    /// Sent as `Authorization: Bearer <api_key>`.
    pub api_key: Option<String>,
    /// The model of assistants that name none.
    pub model: String,
    pub timeout_ms: u64,
    /// Messages of one conversation (`chatId`) kept as context, oldest dropped first.
    pub max_history: usize,
    /// Conversations remembered at once (least recently used dropped first).
    pub max_chats: usize,
    /// `[llm.assistants.NAME]`: `chat(NAME, ...)` uses this system prompt and model.
    pub assistants: BTreeMap<String, LlmAssistant>,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            url: String::new(),
            api_key: None,
            model: "gpt-4o-mini".into(),
            timeout_ms: 30_000,
            max_history: 20,
            max_chats: 10_000,
            assistants: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmAssistant {
    pub system: Option<String>,
    pub model: Option<String>,
    pub temperature: Option<f64>,
}

/// `[jobs]`: how many `cxJob` jobs run at once and how often the queue is checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    pub concurrency: usize,
    /// Delay before a failed job's first retry; doubled for each next one (at most 1 hour).
    pub backoff_ms: u64,
    /// Completed and failed jobs are deleted this many hours after they finish (0: kept).
    pub keep_hours: u64,
    /// Redis queue only: how long a claimed job stays claimed unless its engine renews the
    /// claim (every third of it); a dead engine's job is retried after this.
    pub lease_ms: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            concurrency: 4,
            backoff_ms: 1_000,
            keep_hours: 168,
            lease_ms: 30_000,
        }
    }
}
