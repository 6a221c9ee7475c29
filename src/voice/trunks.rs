//! `[[trunk]]` entries and destination resolution for outbound legs: which next hop, which
//! Request-URI, which caller ID and credentials, and the per-trunk concurrent-call limit.
//!
//! A destination is a full `sip:` URI (sent straight to its host, which must be an IP
//! address: callforge does no DNS), `TRUNK:number` for a named trunk, or a plain number or
//! extension sent through the default trunk.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use thiserror::Error;

use crate::{
    config::TrunkConfig,
    sip::{
        self, digest::Credentials, message::NameAddr, sdp::Codec, ua::OutboundCall, MediaConfig,
        Target, TransportKind,
    },
};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TrunkError {
    #[error("[[trunk]] {name:?}: {message}")]
    Config { name: String, message: String },
    #[error("destination {0:?} is empty or not dialable")]
    BadDestination(String),
    #[error("destination {0:?}: the host must be an IP address (callforge does no DNS)")]
    NeedsIp(String),
    #[error("no trunk named {0:?}")]
    UnknownTrunk(String),
    #[error("no [[trunk]] configured to send {0:?} to; give a sip: URI or configure a trunk")]
    NoDefaultTrunk(String),
    #[error("trunk {name:?} is at its limit of {max} concurrent calls")]
    AtLimit { name: String, max: usize },
}

/// One configured trunk, resolved.
#[derive(Debug)]
pub struct Trunk {
    pub name: String,
    pub target: Target,
    /// `host[:port]` as written, for Request-URIs.
    host: String,
    auth: Option<Credentials>,
    caller_id: Option<String>,
    force_caller_id: bool,
    prefix: String,
    strip_plus: bool,
    pub codecs: Vec<Codec>,
    max_calls: usize,
    active: AtomicUsize,
}

impl Trunk {
    /// Calls up right now through this trunk.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Holds one of a trunk's concurrent-call places until dropped.
#[derive(Debug)]
pub struct TrunkSlot(Option<Arc<Trunk>>);

impl Drop for TrunkSlot {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Where and how to place one outbound leg.
#[derive(Debug, Clone)]
pub struct Dialed {
    pub trunk: Option<Arc<Trunk>>,
    pub target: Target,
    pub request_uri: String,
    /// The user part the To header names.
    pub number: String,
    pub auth: Option<Credentials>,
    /// The caller ID to send (a user part), after the trunk's rules.
    pub caller_id: Option<String>,
    pub codecs: Vec<Codec>,
}

impl Dialed {
    /// The caller ID's user part as sent (`callforge` when there is none).
    pub fn from_user(&self) -> &str {
        self.caller_id.as_deref().unwrap_or("callforge")
    }

    /// The INVITE for this leg: our RTP at `local_ip:rtp_port` offered with the leg's codecs,
    /// From the caller ID at `local_ip`, To the dialled number at the next hop.
    pub fn outbound_call(
        &self,
        local_ip: IpAddr,
        rtp_port: u16,
        display: Option<String>,
        headers: Vec<(String, String)>,
    ) -> OutboundCall {
        let mut media = MediaConfig::new(local_ip, rtp_port);
        media.codecs = self.codecs.clone();
        let mut from = NameAddr::new(format!("sip:{}@{local_ip}", self.from_user()));
        from.display = display;
        // To names the dialled number where the Request-URI does, port included (a far end on
        // a non-default port otherwise sees a To that is not itself).
        let host = match sip::message::uri_host_port(&self.request_uri) {
            Some((h, port)) => {
                let h = if h.contains(':') { format!("[{h}]") } else { h };
                match port {
                    Some(p) => format!("{h}:{p}"),
                    None => h,
                }
            }
            None => match self.target.addr {
                SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
                a => a.to_string(),
            },
        };
        OutboundCall {
            target: self.target,
            request_uri: self.request_uri.clone(),
            from,
            to: NameAddr::new(format!("sip:{}@{host}", self.number)),
            media,
            local: None,
            headers,
            auth: self.auth.clone(),
        }
    }

    /// Take a place on the trunk, or say it is full.
    pub fn acquire(&self) -> Result<TrunkSlot, TrunkError> {
        let Some(trunk) = &self.trunk else {
            return Ok(TrunkSlot(None));
        };
        let now = trunk.active.fetch_add(1, Ordering::Relaxed);
        if trunk.max_calls > 0 && now >= trunk.max_calls {
            trunk.active.fetch_sub(1, Ordering::Relaxed);
            return Err(TrunkError::AtLimit {
                name: trunk.name.clone(),
                max: trunk.max_calls,
            });
        }
        Ok(TrunkSlot(Some(trunk.clone())))
    }
}

/// Every configured trunk and which one is the default.
#[derive(Debug, Default)]
pub struct Trunks {
    list: Vec<Arc<Trunk>>,
    default: Option<usize>,
    fallback_codecs: Vec<Codec>,
}

/// `IP[:port]` → a socket address (port 5060 when absent).
fn ip_host(host_port: &str, port: Option<u16>) -> Option<SocketAddr> {
    let ip: IpAddr = host_port
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .ok()?;
    Some(SocketAddr::new(ip, port.unwrap_or(5060)))
}

impl Trunks {
    pub fn build(configs: &[TrunkConfig], fallback_codecs: &[Codec]) -> Result<Self, TrunkError> {
        let mut list = Vec::new();
        let mut default = None;
        for (i, c) in configs.iter().enumerate() {
            let err = |message: String| TrunkError::Config {
                name: c.name.clone(),
                message,
            };
            if c.name.is_empty() || c.name.contains([':', '@', ' ']) {
                return Err(err(
                    "name must be non-empty without ':', '@' or spaces".into()
                ));
            }
            if list.iter().any(|t: &Arc<Trunk>| t.name == c.name) {
                return Err(err("defined twice".into()));
            }
            let uri = if c.uri.contains(':') && !c.uri.starts_with("sip") {
                format!("sip:{}", c.uri)
            } else {
                c.uri.clone()
            };
            let (host, port) = sip::message::uri_host_port(&uri)
                .ok_or_else(|| err(format!("uri {:?} is not host:port or a sip: URI", c.uri)))?;
            let addr = ip_host(&host, port).ok_or_else(|| {
                err(format!(
                    "uri {:?}: the host must be an IP address (no DNS)",
                    c.uri
                ))
            })?;
            let transport = match c.transport.to_ascii_lowercase().as_str() {
                "udp" => TransportKind::Udp,
                "tcp" => TransportKind::Tcp,
                other => return Err(err(format!("transport {other:?} (udp, tcp)"))),
            };
            let auth = match (&c.username, &c.password) {
                (Some(u), Some(p)) => Some(Credentials {
                    username: u.clone(),
                    password: p.clone(),
                }),
                (None, None) => None,
                _ => return Err(err("username and password go together".into())),
            };
            let codecs = match &c.codecs {
                Some(l) => Codec::parse_list(l).map_err(err)?,
                None => fallback_codecs.to_vec(),
            };
            if c.default {
                if default.is_some() {
                    return Err(err("a second trunk marked default".into()));
                }
                default = Some(i);
            }
            let host = match port {
                Some(p) => format!("{host}:{p}"),
                None => host,
            };
            list.push(Arc::new(Trunk {
                name: c.name.clone(),
                target: Target { addr, transport },
                host,
                auth,
                caller_id: c.caller_id.clone(),
                force_caller_id: c.force_caller_id,
                prefix: c.prefix.clone(),
                strip_plus: c.strip_plus,
                codecs,
                max_calls: c.max_calls,
                active: AtomicUsize::new(0),
            }));
        }
        if default.is_none() && !list.is_empty() {
            default = Some(0);
        }
        Ok(Trunks {
            list,
            default,
            fallback_codecs: fallback_codecs.to_vec(),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Trunk>> {
        self.list.iter().find(|t| t.name == name)
    }

    /// Resolve `dest` (see the module doc); `trunk` forces a trunk for plain numbers.
    pub fn resolve(
        &self,
        dest: &str,
        trunk: Option<&str>,
        caller_id: Option<&str>,
    ) -> Result<Dialed, TrunkError> {
        let dest = dest.trim();
        let lower = dest.to_ascii_lowercase();
        if lower.starts_with("sip:") || lower.starts_with("sips:") {
            return self.resolve_uri(dest, caller_id);
        }
        let (trunk, number) = match (trunk, dest.split_once(':')) {
            (Some(name), _) => (self.named(name)?, dest),
            (None, Some((name, number))) => (self.named(name)?, number),
            (None, None) => {
                let t = self
                    .default
                    .map(|i| &self.list[i])
                    .ok_or_else(|| TrunkError::NoDefaultTrunk(dest.to_string()))?;
                (t, dest)
            }
        };
        if number.is_empty()
            || !number
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+*#-_.".contains(c))
        {
            return Err(TrunkError::BadDestination(dest.to_string()));
        }
        let mut number = number.to_string();
        if trunk.strip_plus {
            number = number.trim_start_matches('+').to_string();
        }
        number = format!("{}{number}", trunk.prefix);
        let scheme_params = if trunk.target.transport == TransportKind::Tcp {
            ";transport=tcp"
        } else {
            ""
        };
        let caller = if trunk.force_caller_id {
            trunk.caller_id.clone()
        } else {
            caller_id
                .map(str::to_string)
                .or_else(|| trunk.caller_id.clone())
        }
        .map(|c| {
            if trunk.strip_plus {
                c.trim_start_matches('+').to_string()
            } else {
                c
            }
        });
        Ok(Dialed {
            trunk: Some(trunk.clone()),
            target: trunk.target,
            request_uri: format!("sip:{number}@{}{scheme_params}", trunk.host),
            number,
            auth: trunk.auth.clone(),
            caller_id: caller,
            codecs: trunk.codecs.clone(),
        })
    }

    fn named(&self, name: &str) -> Result<&Arc<Trunk>, TrunkError> {
        self.get(name)
            .ok_or_else(|| TrunkError::UnknownTrunk(name.to_string()))
    }

    fn resolve_uri(&self, uri: &str, caller_id: Option<&str>) -> Result<Dialed, TrunkError> {
        if uri
            .chars()
            .any(|c| c.is_whitespace() || c == '<' || c == '>')
        {
            return Err(TrunkError::BadDestination(uri.to_string()));
        }
        let (host, port) = sip::message::uri_host_port(uri)
            .ok_or_else(|| TrunkError::BadDestination(uri.to_string()))?;
        let addr = ip_host(&host, port).ok_or_else(|| TrunkError::NeedsIp(uri.to_string()))?;
        let transport = if uri.to_ascii_lowercase().contains(";transport=tcp") {
            TransportKind::Tcp
        } else {
            TransportKind::Udp
        };
        // A URI naming a configured trunk's address gets that trunk's credentials and limit.
        let trunk = self
            .list
            .iter()
            .find(|t| t.target.addr == addr && t.target.transport == transport)
            .cloned();
        let number = sip::message::uri_user(uri).unwrap_or_default();
        Ok(Dialed {
            auth: trunk.as_ref().and_then(|t| t.auth.clone()),
            codecs: trunk
                .as_ref()
                .map_or_else(|| self.fallback_codecs.clone(), |t| t.codecs.clone()),
            trunk,
            target: Target { addr, transport },
            request_uri: uri.to_string(),
            number,
            caller_id: caller_id.map(str::to_string),
        })
    }

    /// `(name, active, max)` of each trunk, for the API.
    pub fn usage(&self) -> Vec<(String, usize, usize)> {
        self.list
            .iter()
            .map(|t| (t.name.clone(), t.active(), t.max_calls))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trunk(name: &str, uri: &str) -> TrunkConfig {
        TrunkConfig {
            name: name.into(),
            uri: uri.into(),
            transport: "udp".into(),
            username: None,
            password: None,
            caller_id: None,
            force_caller_id: false,
            prefix: String::new(),
            strip_plus: false,
            codecs: None,
            max_calls: 0,
            default: false,
        }
    }

    #[test]
    fn numbers_go_through_the_default_trunk_with_its_rules() {
        let mut a = trunk("a", "10.0.0.1:5080");
        a.strip_plus = true;
        a.prefix = "9".into();
        a.caller_id = Some("+15550100".into());
        let mut b = trunk("b", "sip:10.0.0.2");
        b.default = true;
        b.codecs = Some(vec!["PCMA".into()]);
        let t = Trunks::build(&[a, b], &[Codec::Pcmu]).unwrap();
        let d = t.resolve("+4420", None, Some("777")).unwrap();
        assert_eq!(d.request_uri, "sip:+4420@10.0.0.2");
        assert_eq!(d.target.addr, "10.0.0.2:5060".parse().unwrap());
        assert_eq!(d.codecs, vec![Codec::Pcma]);
        assert_eq!(d.caller_id.as_deref(), Some("777"));
        let d = t.resolve("a:+4420", None, None).unwrap();
        assert_eq!(d.request_uri, "sip:94420@10.0.0.1:5080");
        assert_eq!(d.caller_id.as_deref(), Some("15550100"));
        assert_eq!(d.codecs, vec![Codec::Pcmu]);
        assert_eq!(
            t.resolve("c:1", None, None).unwrap_err(),
            TrunkError::UnknownTrunk("c".into())
        );
        assert!(matches!(
            t.resolve("12 34", None, None),
            Err(TrunkError::BadDestination(_))
        ));
    }

    #[test]
    fn sip_uris_need_ip_hosts_and_pick_up_a_matching_trunk() {
        let mut a = trunk("a", "127.0.0.1:5099");
        a.username = Some("u".into());
        a.password = Some("p".into());
        let t = Trunks::build(&[a], &[Codec::Pcmu]).unwrap();
        let d = t.resolve("sip:100@127.0.0.1:5099", None, None).unwrap();
        assert_eq!(d.auth.as_ref().map(|c| c.username.as_str()), Some("u"));
        assert_eq!(d.number, "100");
        let d = t.resolve("sip:100@127.0.0.1:6000", None, None).unwrap();
        assert!(d.auth.is_none() && d.trunk.is_none());
        assert!(matches!(
            t.resolve("sip:100@pbx.example.com", None, None),
            Err(TrunkError::NeedsIp(_))
        ));
        let none = Trunks::build(&[], &[Codec::Pcmu]).unwrap();
        assert!(matches!(
            none.resolve("100", None, None),
            Err(TrunkError::NoDefaultTrunk(_))
        ));
    }

    #[test]
    fn the_b_legs_to_names_the_request_uris_host_and_port() {
        let t = Trunks::build(&[trunk("a", "127.0.0.1:5099")], &[Codec::Pcmu]).unwrap();
        let ip = "127.0.0.1".parse().unwrap();
        let via_trunk = t.resolve("2001", None, None).unwrap();
        let oc = via_trunk.outbound_call(ip, 4000, None, Vec::new());
        assert_eq!(oc.to.uri, "sip:2001@127.0.0.1:5099");
        let direct = t.resolve("sip:2002@127.0.0.1:6000", None, None).unwrap();
        let oc = direct.outbound_call(ip, 4000, None, Vec::new());
        assert_eq!(oc.to.uri, "sip:2002@127.0.0.1:6000");
        let default_port = t.resolve("sip:2003@127.0.0.2", None, None).unwrap();
        let oc = default_port.outbound_call(ip, 4000, None, Vec::new());
        assert_eq!(oc.to.uri, "sip:2003@127.0.0.2");
    }

    #[test]
    fn the_concurrent_call_limit_holds_and_frees_places() {
        let mut a = trunk("a", "127.0.0.1:5099");
        a.max_calls = 2;
        let t = Trunks::build(&[a], &[Codec::Pcmu]).unwrap();
        let d = t.resolve("1", None, None).unwrap();
        let s1 = d.acquire().unwrap();
        let _s2 = d.acquire().unwrap();
        assert!(matches!(
            d.acquire(),
            Err(TrunkError::AtLimit { max: 2, .. })
        ));
        drop(s1);
        let _s3 = d.acquire().unwrap();
        assert_eq!(t.usage()[0], ("a".to_string(), 2, 2));
    }

    #[test]
    fn bad_trunks_are_refused_at_startup() {
        let bad = [
            trunk("x", "pbx.example.com:5060"),
            trunk("", "127.0.0.1"),
            {
                let mut t = trunk("x", "127.0.0.1");
                t.username = Some("u".into());
                t
            },
            {
                let mut t = trunk("x", "127.0.0.1");
                t.transport = "tls".into();
                t
            },
        ];
        for b in bad {
            assert!(Trunks::build(&[b], &[Codec::Pcmu]).is_err());
        }
        assert!(Trunks::build(
            &[trunk("x", "127.0.0.1"), trunk("x", "127.0.0.2")],
            &[Codec::Pcmu]
        )
        .is_err());
    }
}
