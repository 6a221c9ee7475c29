//! Who may start something here: the source ACL, per-source request rate and concurrent-call
//! limits (in the spirit of Kamailio's pike), and the drain state. Sans-IO: the user agent asks
//! [`Guard::check`] about each new out-of-dialog request with the current instant.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use ipnet::IpNet;

use super::transaction::TransportKind;
use crate::metrics::{metrics, Metrics};

/// What happens to a refused request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DenyAction {
    /// Answer it (403 for the ACL, 503 for limits).
    #[default]
    Reject,
    /// Say nothing: a scanner learns nothing and costs one packet.
    Drop,
}

/// The rules; replaced whole on reload.
#[derive(Debug, Clone, Default)]
pub struct GuardPolicy {
    /// Sources allowed to send new requests; empty allows every source.
    pub allow: Vec<IpNet>,
    /// Listeners with their own list, used instead of `allow` for requests they receive:
    /// (transport, bound address, list). A wildcard address matches any local IP on its port.
    pub listeners: Vec<(TransportKind, SocketAddr, Vec<IpNet>)>,
    pub deny_action: DenyAction,
    /// New out-of-dialog requests per second one source IP may send (0 = no limit); bursts
    /// up to one second's worth are absorbed.
    pub rate_per_source: u32,
    /// Calls one source IP may have in progress at once (0 = no limit).
    pub calls_per_source: u32,
    pub limit_action: DenyAction,
    /// `Retry-After` seconds on 503s.
    pub retry_after: u32,
}

impl GuardPolicy {
    /// Whether `ip` may send new requests to the listener `local` (over `transport`).
    pub fn allows(&self, ip: IpAddr, local: SocketAddr, transport: TransportKind) -> bool {
        let own = self.listeners.iter().find(|(t, addr, _)| {
            *t == transport
                && addr.port() == local.port()
                && (addr.ip() == local.ip() || addr.ip().is_unspecified())
        });
        match own {
            Some((_, _, list)) => allowed(list, ip),
            None => allowed(&self.allow, ip),
        }
    }
}

/// True when `list` is empty or holds a network containing `ip` (IPv4-mapped IPv6 included).
pub fn allowed(list: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    list.is_empty() || list.iter().any(|n| n.contains(&ip))
}

/// Parses `"10.0.0.0/8"`, `"192.0.2.7"` (a single host) or `"::1"`.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{text:?} is not an IP address or CIDR network"))
}

/// Why a request was refused (the `reason` label of `callforge_sip_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Acl,
    Draining,
    Rate,
    Concurrent,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Acl => "acl",
            Refusal::Draining => "draining",
            Refusal::Rate => "rate",
            Refusal::Concurrent => "concurrent",
        }
    }
}

/// The guard's answer about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Answer with `code` (and `Retry-After` when set), statelessly.
    Reject {
        code: u16,
        retry_after: Option<u32>,
        why: Refusal,
    },
    Drop(Refusal),
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-source state and the drain flag.
#[derive(Debug, Default)]
pub struct Guard {
    policy: GuardPolicy,
    draining: bool,
    buckets: HashMap<IpAddr, Bucket>,
    calls: HashMap<IpAddr, u32>,
    /// Last refusal log line per reason, and how many were not logged since.
    logged: [(Option<Instant>, u64); 4],
}

/// One log line per reason per this long; the metric counts every refusal.
/// One [`Guard`] shared by the user agent and the class4 fast path's workers (see
/// `routing::fast`), so ACL, draining, rate and per-source call limits are one set of books
/// whichever thread received the request. Uncontended, the lock costs tens of nanoseconds.
#[derive(Debug, Clone, Default)]
pub struct SharedGuard(std::sync::Arc<std::sync::Mutex<Guard>>);

impl SharedGuard {
    pub fn new(guard: Guard) -> Self {
        SharedGuard(std::sync::Arc::new(std::sync::Mutex::new(guard)))
    }

    /// The guard; a panic elsewhere while it was held leaves its counters usable.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Guard> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

const LOG_EVERY: Duration = Duration::from_secs(10);
/// Past this many tracked sources, full (idle) buckets are forgotten.
const MAX_BUCKETS: usize = 10_000;

impl Guard {
    pub fn new(policy: GuardPolicy) -> Self {
        Guard {
            policy,
            ..Guard::default()
        }
    }

    pub fn set_policy(&mut self, policy: GuardPolicy) {
        self.policy = policy;
        self.buckets.clear();
    }

    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    pub fn draining(&self) -> bool {
        self.draining
    }

    /// A new out-of-dialog request from `source`, received on `local`.
    pub fn check(
        &mut self,
        source: super::Target,
        local: SocketAddr,
        method: &rsip::Method,
        now: Instant,
    ) -> Verdict {
        let ip = source.addr.ip();
        if !self.policy.allows(ip, local, source.transport) {
            return self.refuse(ip, Refusal::Acl, now);
        }
        let invite = *method == rsip::Method::Invite;
        if self.draining && (invite || *method == rsip::Method::Options) {
            return self.refuse(ip, Refusal::Draining, now);
        }
        if self.policy.rate_per_source > 0 && !self.take_token(ip, now) {
            return self.refuse(ip, Refusal::Rate, now);
        }
        if invite
            && self.policy.calls_per_source > 0
            && self.calls.get(&ip).copied().unwrap_or(0) >= self.policy.calls_per_source
        {
            return self.refuse(ip, Refusal::Concurrent, now);
        }
        Verdict::Pass
    }

    /// A call from `ip` was admitted / has ended.
    pub fn call_started(&mut self, ip: IpAddr) {
        *self.calls.entry(ip).or_default() += 1;
    }

    pub fn call_ended(&mut self, ip: IpAddr) {
        if let Some(n) = self.calls.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.calls.remove(&ip);
            }
        }
    }

    fn take_token(&mut self, ip: IpAddr, now: Instant) -> bool {
        let rate = f64::from(self.policy.rate_per_source);
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(&ip) {
            self.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < rate
            });
        }
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: rate,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(rate);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn refuse(&mut self, ip: IpAddr, why: Refusal, now: Instant) -> Verdict {
        Metrics::inc(&metrics().sip_rejected, "reason", why.label());
        let slot = &mut self.logged[why as usize];
        if slot
            .0
            .is_none_or(|at| now.saturating_duration_since(at) >= LOG_EVERY)
        {
            tracing::warn!(
                source = %ip,
                reason = why.label(),
                suppressed = slot.1,
                "refusing SIP request (further refusals for this reason are counted in callforge_sip_rejected_total, logged at most every 10 s)"
            );
            *slot = (Some(now), 0);
        } else {
            slot.1 += 1;
        }
        let action = match why {
            Refusal::Acl => self.policy.deny_action,
            Refusal::Rate | Refusal::Concurrent => self.policy.limit_action,
            Refusal::Draining => DenyAction::Reject,
        };
        match (action, why) {
            (DenyAction::Drop, _) => Verdict::Drop(why),
            (DenyAction::Reject, Refusal::Acl) => Verdict::Reject {
                code: 403,
                retry_after: None,
                why,
            },
            (DenyAction::Reject, _) => Verdict::Reject {
                code: 503,
                retry_after: Some(self.policy.retry_after.max(1)),
                why,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn src_ip(ip: IpAddr) -> super::super::Target {
        super::super::Target {
            addr: SocketAddr::new(ip, 5099),
            transport: TransportKind::Udp,
        }
    }

    fn src(s: &str) -> super::super::Target {
        src_ip(ip(s))
    }

    fn local() -> SocketAddr {
        "127.0.0.1:5060".parse().unwrap()
    }

    #[test]
    fn a_listener_with_its_own_list_uses_it() {
        let any: SocketAddr = "0.0.0.0:5070".parse().unwrap();
        let mut g = Guard::new(GuardPolicy {
            allow: vec![parse_net("127.0.0.1").unwrap()],
            listeners: vec![(
                TransportKind::Udp,
                any,
                vec![parse_net("127.0.0.9").unwrap()],
            )],
            ..GuardPolicy::default()
        });
        let now = Instant::now();
        let inv = rsip::Method::Invite;
        let on_5070: SocketAddr = "127.0.0.1:5070".parse().unwrap();
        assert_eq!(g.check(src("127.0.0.9"), on_5070, &inv, now), Verdict::Pass);
        assert_ne!(g.check(src("127.0.0.1"), on_5070, &inv, now), Verdict::Pass);
        // Other listeners keep the global list.
        assert_eq!(g.check(src("127.0.0.1"), local(), &inv, now), Verdict::Pass);
        assert_ne!(g.check(src("127.0.0.9"), local(), &inv, now), Verdict::Pass);
    }

    #[test]
    fn acl_admits_listed_networks_only() {
        let mut g = Guard::new(GuardPolicy {
            allow: vec![
                parse_net("127.0.0.1").unwrap(),
                parse_net("10.1.0.0/16").unwrap(),
            ],
            ..GuardPolicy::default()
        });
        let now = Instant::now();
        let inv = rsip::Method::Invite;
        assert_eq!(g.check(src("127.0.0.1"), local(), &inv, now), Verdict::Pass);
        assert_eq!(
            g.check(src("10.1.200.3"), local(), &inv, now),
            Verdict::Pass
        );
        assert_eq!(
            g.check(src("::ffff:10.1.0.9"), local(), &inv, now),
            Verdict::Pass
        );
        assert!(matches!(
            g.check(src("127.0.0.2"), local(), &inv, now),
            Verdict::Reject { code: 403, .. }
        ));
        g.set_policy(GuardPolicy {
            allow: vec![parse_net("127.0.0.1/32").unwrap()],
            deny_action: DenyAction::Drop,
            ..GuardPolicy::default()
        });
        assert_eq!(
            g.check(src("127.0.0.2"), local(), &inv, now),
            Verdict::Drop(Refusal::Acl)
        );
        assert!(parse_net("10.0.0.0/33").is_err());
        assert!(parse_net("example.net").is_err());
    }

    #[test]
    fn rate_limit_is_per_source_and_refills() {
        let mut g = Guard::new(GuardPolicy {
            rate_per_source: 5,
            retry_after: 2,
            ..GuardPolicy::default()
        });
        let t0 = Instant::now();
        let opt = rsip::Method::Options;
        let passed = (0..20)
            .filter(|_| g.check(src("127.0.0.3"), local(), &opt, t0) == Verdict::Pass)
            .count();
        assert_eq!(passed, 5);
        // Another source is not affected.
        assert_eq!(g.check(src("127.0.0.4"), local(), &opt, t0), Verdict::Pass);
        assert_eq!(
            g.check(src("127.0.0.3"), local(), &opt, t0),
            Verdict::Reject {
                code: 503,
                retry_after: Some(2),
                why: Refusal::Rate
            }
        );
        // 400 ms later two tokens are back.
        let t1 = t0 + Duration::from_millis(400);
        assert_eq!(g.check(src("127.0.0.3"), local(), &opt, t1), Verdict::Pass);
        assert_eq!(g.check(src("127.0.0.3"), local(), &opt, t1), Verdict::Pass);
        assert_ne!(g.check(src("127.0.0.3"), local(), &opt, t1), Verdict::Pass);
    }

    #[test]
    fn concurrent_calls_and_draining() {
        let mut g = Guard::new(GuardPolicy {
            calls_per_source: 2,
            ..GuardPolicy::default()
        });
        let now = Instant::now();
        let inv = rsip::Method::Invite;
        let a = ip("127.0.0.5");
        g.call_started(a);
        g.call_started(a);
        assert!(matches!(
            g.check(src_ip(a), local(), &inv, now),
            Verdict::Reject {
                why: Refusal::Concurrent,
                ..
            }
        ));
        assert_eq!(
            g.check(src_ip(a), local(), &rsip::Method::Options, now),
            Verdict::Pass
        );
        g.call_ended(a);
        assert_eq!(g.check(src_ip(a), local(), &inv, now), Verdict::Pass);
        g.set_draining(true);
        assert!(matches!(
            g.check(src_ip(a), local(), &rsip::Method::Options, now),
            Verdict::Reject { code: 503, .. }
        ));
        assert_eq!(
            g.check(src_ip(a), local(), &rsip::Method::Message, now),
            Verdict::Pass
        );
    }
}
