//! Digest authentication of requests callers send us (RFC 3261 §22 as the server): challenges
//! with nonces that expire, answers checked against the configured accounts, replays refused
//! (a nonce's `nc` must grow; without qop a nonce is good once).

use std::{
    collections::{HashMap, VecDeque},
    hash::{BuildHasher, Hasher},
    sync::Arc,
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};

use super::{
    digest::{params, Algorithm, Challenge},
    message,
};

/// How a request's credentials fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Good credentials of this user.
    Authenticated(String),
    /// No (usable) credentials, or a nonce that expired: answer 401 with this
    /// `WWW-Authenticate` value.
    Challenge(String),
    /// Wrong password, unknown user or a replayed answer: answer 403.
    Refused(&'static str),
}

#[derive(Debug)]
struct NonceState {
    issued: Instant,
    /// Highest `nc` accepted so far (0: none), or `u32::MAX` once a qop-less answer used it.
    last_nc: u32,
}

/// Issues nonces and checks answers; owned by the one task that admits calls.
#[derive(Debug)]
pub struct DigestVerifier {
    realm: String,
    ttl: Duration,
    users: Arc<HashMap<String, String>>,
    nonces: HashMap<String, NonceState>,
    order: VecDeque<(Instant, String)>,
    secret: [u8; 32],
    counter: u64,
}

/// Nonces remembered at most; past it the oldest are forgotten (their callers get a new
/// challenge), so a flood of unauthenticated INVITEs cannot grow memory without bound.
const MAX_NONCES: usize = 100_000;

impl DigestVerifier {
    pub fn new(realm: &str, ttl: Duration, users: Arc<HashMap<String, String>>) -> Self {
        let mut secret = [0u8; 32];
        for chunk in secret.chunks_mut(8) {
            // RandomState is seeded from the OS's randomness once per process.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
        DigestVerifier {
            realm: realm.to_string(),
            ttl,
            users,
            nonces: HashMap::new(),
            order: VecDeque::new(),
            secret,
            counter: 0,
        }
    }

    /// New accounts and realm (reload); issued nonces stay valid.
    pub fn update(&mut self, realm: &str, ttl: Duration, users: Arc<HashMap<String, String>>) {
        self.realm = realm.to_string();
        self.ttl = ttl;
        self.users = users;
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) <= self.ttl && self.order.len() < MAX_NONCES {
                break;
            }
            if let Some((_, n)) = self.order.pop_front() {
                self.nonces.remove(&n);
            }
        }
    }

    fn challenge(&mut self, stale: bool, now: Instant) -> AuthOutcome {
        self.expire(now);
        self.counter += 1;
        let mut h = Sha256::new();
        h.update(self.secret);
        h.update(self.counter.to_le_bytes());
        let nonce = hex::encode(&h.finalize()[..16]);
        self.nonces.insert(
            nonce.clone(),
            NonceState {
                issued: now,
                last_nc: 0,
            },
        );
        self.order.push_back((now, nonce.clone()));
        let mut v = format!(
            "Digest realm=\"{}\", nonce=\"{nonce}\", algorithm=MD5, qop=\"auth\"",
            self.realm
        );
        if stale {
            v.push_str(", stale=true");
        }
        AuthOutcome::Challenge(v)
    }

    /// Checks the `Authorization` header of `req`.
    pub fn check(&mut self, req: &rsip::Request, now: Instant) -> AuthOutcome {
        let headers = message::headers_named(&req.headers, "Authorization");
        let Some(value) = headers.iter().find(|v| {
            v.trim_start()
                .get(..6)
                .is_some_and(|s| s.eq_ignore_ascii_case("digest"))
        }) else {
            return self.challenge(false, now);
        };
        let fields: HashMap<String, String> =
            params(value.trim_start()[6..].trim()).into_iter().collect();
        let get = |k: &str| fields.get(k).map(String::as_str);
        let (Some(username), Some(nonce), Some(uri), Some(response)) =
            (get("username"), get("nonce"), get("uri"), get("response"))
        else {
            return self.challenge(false, now);
        };
        if get("realm") != Some(self.realm.as_str()) {
            return self.challenge(false, now);
        }
        let algorithm = match get("algorithm").map(str::to_ascii_uppercase).as_deref() {
            None | Some("MD5") => Algorithm::Md5,
            Some("SHA-256") => Algorithm::Sha256,
            Some(_) => return self.challenge(false, now),
        };
        self.expire(now);
        let Some(state) = self.nonces.get(nonce) else {
            // Not ours, or expired and forgotten: a fresh nonce, marked stale so a client
            // that knows the password retries without asking its user.
            return self.challenge(true, now);
        };
        if now.saturating_duration_since(state.issued) > self.ttl {
            return self.challenge(true, now);
        }
        let qop_auth = get("qop").is_some_and(|q| q.eq_ignore_ascii_case("auth"));
        let (nc_text, cnonce) = if qop_auth {
            match (get("nc"), get("cnonce")) {
                (Some(nc), Some(c)) => (nc, c),
                _ => return self.challenge(false, now),
            }
        } else {
            ("", "")
        };
        let nc = if qop_auth {
            match u32::from_str_radix(nc_text, 16) {
                Ok(n) if n > state.last_nc && state.last_nc != u32::MAX => n,
                _ => return AuthOutcome::Refused("replayed or out-of-order nonce count"),
            }
        } else if state.last_nc != 0 {
            return AuthOutcome::Refused("nonce already used");
        } else {
            u32::MAX
        };
        let Some(password) = self.users.get(username) else {
            return AuthOutcome::Refused("unknown user or wrong password");
        };
        let expected = Challenge {
            realm: self.realm.clone(),
            nonce: nonce.to_string(),
            opaque: None,
            algorithm,
            qop_auth,
            stale: false,
        }
        .response(
            username,
            password,
            req.method.to_string().as_str(),
            uri,
            cnonce,
            nc_text,
        );
        if !constant_time_eq(
            expected.as_bytes(),
            response.to_ascii_lowercase().as_bytes(),
        ) {
            return AuthOutcome::Refused("unknown user or wrong password");
        }
        if let Some(s) = self.nonces.get_mut(nonce) {
            s.last_nc = nc;
        }
        AuthOutcome::Authenticated(username.to_string())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invite(auth: Option<&str>) -> rsip::Request {
        let mut text = String::from(
            "INVITE sip:100@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:100@127.0.0.1>\r\nCall-ID: c1\r\nCSeq: 2 INVITE\r\nMax-Forwards: 70\r\n",
        );
        if let Some(a) = auth {
            text.push_str(&format!("Authorization: {a}\r\n"));
        }
        text.push_str("Content-Length: 0\r\n\r\n");
        rsip::Request::try_from(text.as_bytes()).unwrap()
    }

    fn verifier() -> DigestVerifier {
        let users = HashMap::from([("alice".to_string(), "s3cret".to_string())]);
        DigestVerifier::new("test", Duration::from_secs(30), Arc::new(users))
    }

    fn nonce_of(outcome: &AuthOutcome) -> Challenge {
        match outcome {
            AuthOutcome::Challenge(v) => Challenge::parse(v).unwrap(),
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    #[test]
    fn good_answer_passes_and_replay_wrong_password_and_expiry_fail() {
        let mut v = verifier();
        let t0 = Instant::now();
        let ch = nonce_of(&v.check(&invite(None), t0));
        assert!(ch.qop_auth);
        let good = ch.answer("alice", "s3cret", "INVITE", "sip:100@127.0.0.1", "cn", 1);
        assert_eq!(
            v.check(&invite(Some(&good)), t0),
            AuthOutcome::Authenticated("alice".into())
        );
        // The same nc again is a replay.
        assert!(matches!(
            v.check(&invite(Some(&good)), t0),
            AuthOutcome::Refused(_)
        ));
        let next = ch.answer("alice", "s3cret", "INVITE", "sip:100@127.0.0.1", "cn2", 2);
        assert!(matches!(
            v.check(&invite(Some(&next)), t0),
            AuthOutcome::Authenticated(_)
        ));
        let wrong = ch.answer("alice", "guess", "INVITE", "sip:100@127.0.0.1", "cn", 3);
        assert!(matches!(
            v.check(&invite(Some(&wrong)), t0),
            AuthOutcome::Refused(_)
        ));
        let stranger = ch.answer("mallory", "s3cret", "INVITE", "sip:100@127.0.0.1", "cn", 4);
        assert!(matches!(
            v.check(&invite(Some(&stranger)), t0),
            AuthOutcome::Refused(_)
        ));
        // After the nonce's lifetime the right password gets a stale challenge.
        let late = ch.answer("alice", "s3cret", "INVITE", "sip:100@127.0.0.1", "cn", 5);
        let again = nonce_of(&v.check(&invite(Some(&late)), t0 + Duration::from_secs(31)));
        assert!(again.stale);
        assert_ne!(again.nonce, ch.nonce);
        // A nonce we never issued is challenged, not accepted.
        let forged = Challenge {
            nonce: "00".into(),
            ..ch.clone()
        }
        .answer("alice", "s3cret", "INVITE", "sip:100@127.0.0.1", "cn", 1);
        assert!(matches!(
            v.check(&invite(Some(&forged)), t0),
            AuthOutcome::Challenge(_)
        ));
    }
}
