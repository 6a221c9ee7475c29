//! The `[[route]]` table: first route whose regex matches the Request-URI user wins.

use std::{path::Path, sync::Arc};

use regex::Regex;
use serde_json::Value as Json;

use crate::{
    config::{RouteConfig, RouteMode},
    script::{vars, vars::VarsError},
};

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("route {index}: match {pattern:?} is not a valid regex: {source}")]
    BadPattern {
        index: usize,
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("route {index}: {source}")]
    Vars {
        index: usize,
        #[source]
        source: VarsError,
    },
    #[error("route {index}: timeout_action {code} is not a final SIP status (300-699)")]
    BadTimeoutAction { index: usize, code: u16 },
    #[error("route {index}: allow: {message}")]
    BadAllow { index: usize, message: String },
}

/// One compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    pub pattern: Regex,
    /// Script name without `.js`.
    pub script: String,
    pub mode: RouteMode,
    /// The route's own vars (from `vars = FILE`), merged after the script's `NAME.toml`.
    pub vars: Option<Arc<Json>>,
    /// Status for a failed or timed-out class4 script.
    pub timeout_action: u16,
    /// Sources that may use this route (empty: any the listener admits); others get 403.
    pub allow: Vec<ipnet::IpNet>,
    /// INVITEs must carry Digest credentials of a `[[sip.user]]`.
    pub auth: bool,
}

/// All routes in configuration order.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Compiles the routes; relative vars paths are resolved inside `scripts_dir`.
    pub fn build(configs: &[RouteConfig], scripts_dir: &Path) -> Result<Self, RouteError> {
        let mut routes = Vec::with_capacity(configs.len());
        for (index, c) in configs.iter().enumerate() {
            let pattern = Regex::new(&c.pattern).map_err(|source| RouteError::BadPattern {
                index,
                pattern: c.pattern.clone(),
                source,
            })?;
            let vars = match &c.vars {
                None => None,
                Some(p) => {
                    let path = if p.is_absolute() {
                        p.clone()
                    } else {
                        scripts_dir.join(p)
                    };
                    let v =
                        vars::load(&path).map_err(|source| RouteError::Vars { index, source })?;
                    Some(Arc::new(v))
                }
            };
            let timeout_action = c.timeout_action.unwrap_or(500);
            if !(300..=699).contains(&timeout_action) {
                return Err(RouteError::BadTimeoutAction {
                    index,
                    code: timeout_action,
                });
            }
            let allow = c
                .allow
                .iter()
                .map(|a| crate::sip::guard::parse_net(a))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|message| RouteError::BadAllow { index, message })?;
            routes.push(Arc::new(Route {
                allow,
                auth: c.auth,
                pattern,
                script: c
                    .script
                    .strip_suffix(".js")
                    .unwrap_or(&c.script)
                    .to_string(),
                mode: c.mode,
                vars,
                timeout_action,
            }));
        }
        Ok(RouteTable { routes })
    }

    /// The first route matching this Request-URI user (`""` when the URI has none).
    pub fn find(&self, user: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.pattern.is_match(user))
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pattern: &str, script: &str, mode: RouteMode) -> RouteConfig {
        RouteConfig {
            allow: Vec::new(),
            auth: false,
            pattern: pattern.into(),
            script: script.into(),
            mode,
            vars: None,
            timeout_action: None,
        }
    }

    #[test]
    fn first_match_wins_and_js_suffix_is_dropped() {
        let t = RouteTable::build(
            &[
                cfg("^44", "routing.js", RouteMode::Class4),
                cfg(".*", "answer", RouteMode::Class5),
            ],
            Path::new("."),
        )
        .unwrap();
        let r = t.find("447700900555").unwrap();
        assert_eq!((r.script.as_str(), r.mode), ("routing", RouteMode::Class4));
        assert_eq!(r.timeout_action, 500);
        assert_eq!(t.find("1555").unwrap().mode, RouteMode::Class5);
        assert_eq!(t.find("").unwrap().script, "answer");
    }

    #[test]
    fn bad_regex_and_bad_action_are_refused() {
        let e = RouteTable::build(&[cfg("(", "a", RouteMode::Class4)], Path::new(".")).unwrap_err();
        assert!(e.to_string().contains("route 0"), "{e}");
        let mut c = cfg("x", "a", RouteMode::Class4);
        c.timeout_action = Some(200);
        assert!(matches!(
            RouteTable::build(&[c], Path::new(".")),
            Err(RouteError::BadTimeoutAction { code: 200, .. })
        ));
        assert!(
            RouteTable::build(&[cfg("^1", "a", RouteMode::Class4)], Path::new("."))
                .unwrap()
                .find("44")
                .is_none()
        );
    }

    #[test]
    fn the_shipped_example_config_builds() {
        let text = include_str!("../../scripts/routes.example.toml");
        let c = crate::config::Config::parse(text, "routes.example.toml").unwrap();
        let t = RouteTable::build(
            &c.route,
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts")),
        )
        .unwrap();
        assert_eq!(t.find("447700900123").unwrap().script, "dnc");
        let lcr = t.find("447700900555").unwrap();
        assert_eq!((lcr.script.as_str(), lcr.timeout_action), ("routing", 503));
        let carriers = lcr.vars.as_ref().unwrap();
        assert_eq!(
            carriers["routing"]["egress_routing"]
                .as_array()
                .unwrap()
                .len(),
            5
        );
        assert_eq!(t.find("1555").unwrap().mode, RouteMode::Class5);
        assert!(c.gateways.contains_key("alpha"));
    }
}
