//! HTTP Digest authentication for requests callforge sends through trunks (RFC 3261 §22,
//! RFC 2617, RFC 7616): read a 401/407 challenge, answer it with Authorization or
//! Proxy-Authorization. MD5 and SHA-256, with `qop=auth` or without qop.

use md5::{Digest as _, Md5};
use sha2::Sha256;

/// A username and password for answering Digest challenges (e.g. a SIP trunk account).
///
/// `Debug` prints the username only, so credentials can sit in logged structs.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("challenge is not a Digest challenge: {0:?}")]
    NotDigest(String),
    #[error("challenge has no {0}")]
    Missing(&'static str),
    #[error("unsupported digest algorithm {0:?} (MD5 and SHA-256 are supported)")]
    Algorithm(String),
    #[error("unsupported qop {0:?} (only auth is supported)")]
    Qop(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Md5,
    Sha256,
}

/// A parsed `WWW-Authenticate` / `Proxy-Authenticate` Digest challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub opaque: Option<String>,
    pub algorithm: Algorithm,
    /// True when the server offered `qop=auth`.
    pub qop_auth: bool,
    pub stale: bool,
}

/// Split `a=b, c="d, e"` into pairs, honouring quotes.
pub(crate) fn params(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq]
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(stripped) = rest.strip_prefix('"') {
            let mut end = None;
            let mut escaped = false;
            for (i, c) in stripped.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let end = end.unwrap_or(stripped.len());
            value = stripped[..end].replace("\\\"", "\"");
            rest = stripped.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        rest = rest.trim_start().trim_start_matches(',').trim_start();
        out.push((key, value));
    }
    out
}

impl Challenge {
    pub fn parse(header_value: &str) -> Result<Self, DigestError> {
        let v = header_value.trim();
        let scheme_end = v.find(char::is_whitespace).unwrap_or(v.len());
        if !v[..scheme_end].eq_ignore_ascii_case("digest") {
            return Err(DigestError::NotDigest(v.to_string()));
        }
        let mut realm = None;
        let mut nonce = None;
        let mut opaque = None;
        let mut algorithm = Algorithm::Md5;
        let mut qop_auth = false;
        let mut stale = false;
        for (k, val) in params(&v[scheme_end..]) {
            match k.as_str() {
                "realm" => realm = Some(val),
                "nonce" => nonce = Some(val),
                "opaque" => opaque = Some(val),
                "stale" => stale = val.eq_ignore_ascii_case("true"),
                "algorithm" => {
                    algorithm = match val.to_ascii_uppercase().as_str() {
                        "MD5" => Algorithm::Md5,
                        "SHA-256" => Algorithm::Sha256,
                        _ => return Err(DigestError::Algorithm(val)),
                    }
                }
                "qop" => {
                    let offered: Vec<&str> = val.split(',').map(str::trim).collect();
                    if offered.iter().any(|q| q.eq_ignore_ascii_case("auth")) {
                        qop_auth = true;
                    } else {
                        return Err(DigestError::Qop(val));
                    }
                }
                _ => {}
            }
        }
        Ok(Challenge {
            realm: realm.ok_or(DigestError::Missing("realm"))?,
            nonce: nonce.ok_or(DigestError::Missing("nonce"))?,
            opaque,
            algorithm,
            qop_auth,
            stale,
        })
    }

    fn hash(&self, text: &str) -> String {
        match self.algorithm {
            Algorithm::Md5 => hex::encode(Md5::digest(text.as_bytes())),
            Algorithm::Sha256 => hex::encode(Sha256::digest(text.as_bytes())),
        }
    }

    /// The `response` value for these inputs (RFC 2617 §3.2.2.1); the server side computes
    /// the same to check a caller's answer.
    pub fn response(
        &self,
        username: &str,
        password: &str,
        method: &str,
        uri: &str,
        cnonce: &str,
        nc_text: &str,
    ) -> String {
        let ha1 = self.hash(&format!("{username}:{}:{password}", self.realm));
        let ha2 = self.hash(&format!("{method}:{uri}"));
        if self.qop_auth {
            self.hash(&format!(
                "{ha1}:{}:{nc_text}:{cnonce}:auth:{ha2}",
                self.nonce
            ))
        } else {
            self.hash(&format!("{ha1}:{}:{ha2}", self.nonce))
        }
    }

    /// The `Authorization` (or `Proxy-Authorization`) header value answering this challenge
    /// for `method uri`. `cnonce` must be fresh per request; `nc` counts uses of this nonce.
    pub fn answer(
        &self,
        username: &str,
        password: &str,
        method: &str,
        uri: &str,
        cnonce: &str,
        nc: u32,
    ) -> String {
        let nc_text = format!("{nc:08x}");
        let response = self.response(username, password, method, uri, cnonce, &nc_text);
        let algorithm = match self.algorithm {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        };
        let mut out = format!(
            "Digest username=\"{username}\", realm=\"{}\", nonce=\"{}\", uri=\"{uri}\", response=\"{response}\", algorithm={algorithm}",
            self.realm, self.nonce
        );
        if self.qop_auth {
            out.push_str(&format!(", qop=auth, nc={nc_text}, cnonce=\"{cnonce}\""));
        }
        if let Some(opaque) = &self.opaque {
            out.push_str(&format!(", opaque=\"{opaque}\""));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 2617 §3.5's worked example (qop=auth, MD5).
    #[test]
    fn rfc2617_example_response() {
        let c = Challenge::parse(
            r#"Digest realm="testrealm@host.com", qop="auth,auth-int", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41""#,
        )
        .unwrap();
        assert!(c.qop_auth);
        let a = c.answer(
            "Mufasa",
            "Circle Of Life",
            "GET",
            "/dir/index.html",
            "0a4f113b",
            1,
        );
        assert!(
            a.contains(r#"response="6629fae49393a05397450978507c4ef1""#),
            "{a}"
        );
        assert!(
            a.contains("nc=00000001") && a.contains(r#"opaque="5ccc069c403ebaf9f0171e9517f40e41""#)
        );
    }

    /// RFC 7616 §3.9.1's worked example, SHA-256.
    #[test]
    fn rfc7616_sha256_example_response() {
        let c = Challenge::parse(
            r#"Digest realm="http-auth@example.org", qop="auth, auth-int", algorithm=SHA-256, nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS""#,
        )
        .unwrap();
        let a = c.answer(
            "Mufasa",
            "Circle of Life",
            "GET",
            "/dir/index.html",
            "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
            1,
        );
        assert!(
            a.contains(
                r#"response="753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1""#
            ),
            "{a}"
        );
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let c = Credentials {
            username: "alice".into(),
            password: "s3cret-pw".into(),
        };
        let shown = format!("{c:?}");
        assert!(
            shown.contains("alice") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[test]
    fn no_qop_uses_the_rfc2069_form_and_bad_challenges_are_errors() {
        let c =
            Challenge::parse(r#"Digest realm="sip.example", nonce="abc", algorithm=MD5"#).unwrap();
        assert!(!c.qop_auth);
        let a = c.answer("alice", "pw", "INVITE", "sip:bob@sip.example", "x", 1);
        let expected = {
            let ha1 = hex::encode(Md5::digest(b"alice:sip.example:pw"));
            let ha2 = hex::encode(Md5::digest(b"INVITE:sip:bob@sip.example"));
            hex::encode(Md5::digest(format!("{ha1}:abc:{ha2}").as_bytes()))
        };
        assert!(a.contains(&expected) && !a.contains("qop"), "{a}");
        assert!(matches!(
            Challenge::parse("Basic realm=x"),
            Err(DigestError::NotDigest(_))
        ));
        assert_eq!(
            Challenge::parse(r#"Digest nonce="n""#),
            Err(DigestError::Missing("realm"))
        );
        assert!(matches!(
            Challenge::parse(r#"Digest realm="r", nonce="n", algorithm=SHA-512-256"#),
            Err(DigestError::Algorithm(_))
        ));
        assert!(matches!(
            Challenge::parse(r#"Digest realm="r", nonce="n", qop="auth-int""#),
            Err(DigestError::Qop(_))
        ));
    }
}
