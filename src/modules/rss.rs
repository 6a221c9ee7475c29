//! `require('rss-parser')`: the npm package ConnexCS whitelists, as a host module. The module is
//! a class: `new Parser(options)` gives `parseURL(url)` and `parseString(xml)`, both promises
//! of a feed shaped like the npm package's output (`title`, `description`, `link`, `feedUrl`,
//! `lastBuildDate`, `items: [{title, link, pubDate, isoDate, content, contentSnippet, guid,
//! creator, author, categories}]`). Parsing is feed-rs's (RSS 0.9x/1.0/2.0, Atom, JSON Feed).
//!
//! `parseURL` follows `fetch`'s rules: the host must be in `[fetch] allow`, and its timeout,
//! response size cap and `resolve` overrides apply. Failures reject with an `RssError`.

use std::{sync::Arc, time::Duration};

use feed_rs::model::{Entry, Feed, FeedType, Link, Person};
use serde_json::{Map, Value as Json};

use super::fetch::{error_chain, read_capped, FetchService};
use crate::script::{HostCall, HostError, HostMethod, HostModule, HostObject};

/// The class scripts construct. Options kept: `headers` and `timeout` (ms, at most
/// `[fetch] timeout_ms`). A callback as last argument is called Node-style, as npm allows.
const PRELUDE: &str = r#"(function (raw) {
  const orNull = (v) => (v === undefined ? null : v);
  function settle(promise, callback) {
    if (typeof callback !== "function") return promise;
    return promise.then((feed) => { callback(null, feed); }, (err) => { callback(err); });
  }
  class Parser {
    constructor(options) {
      this.options = options !== null && typeof options === "object" ? options : {};
    }
    parseURL(url, callback) {
      const o = this.options;
      return settle(raw.parseURL(url, { headers: orNull(o.headers), timeout: orNull(o.timeout) }), callback);
    }
    parseString(xml, callback) {
      return settle(raw.parseString(xml), callback);
    }
  }
  return Parser;
})"#;

const METHODS: &[HostMethod] = &[
    HostMethod::asynchronous("parseURL"),
    HostMethod::asynchronous("parseString"),
];

/// Sent unless the script's `headers` say otherwise (some feed servers refuse requests
/// without a User-Agent).
const USER_AGENT: &str = "callforge rss-parser";
const ACCEPT: &str =
    "application/rss+xml, application/atom+xml, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.8";

fn rss_error(message: impl Into<String>) -> HostError {
    HostError::new("RssError", format!("rss-parser: {}", message.into()))
}

/// Parse feed bytes (their XML prolog names the encoding) into the npm package's shape.
pub fn parse_feed(bytes: &[u8], base: Option<&str>) -> Result<Json, String> {
    // No made-up ids: an item without a guid has none, as in the npm package.
    let parser = feed_rs::parser::Builder::new()
        .base_uri(base)
        .id_generator(|_, _, _| String::new())
        .build();
    let feed = parser.parse(bytes).map_err(|e| e.to_string())?;
    Ok(feed_json(&feed))
}

fn put(map: &mut Map<String, Json>, key: &str, value: Option<String>) {
    if let Some(v) = value.filter(|v| !v.is_empty()) {
        map.insert(key.into(), Json::String(v));
    }
}

/// The page a feed or item points at: an RSS `<link>` or an Atom `rel="alternate"`.
fn page_link(links: &[Link]) -> Option<String> {
    links
        .iter()
        .find(|l| l.rel.as_deref().is_none_or(|r| r == "alternate"))
        .map(|l| l.href.clone())
}

/// Dates as RSS writes them (RFC 2822; feed-rs does not keep the source's own text) and as
/// `Date.prototype.toISOString` does.
macro_rules! rfc2822 {
    ($date:expr) => {
        $date.map(|d| d.to_rfc2822())
    };
}
macro_rules! iso {
    ($date:expr) => {
        $date.map(|d| d.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
    };
}

fn feed_json(feed: &Feed) -> Json {
    let mut out = Map::new();
    let items: Vec<Json> = feed
        .entries
        .iter()
        .map(|e| entry_json(e, &feed.feed_type))
        .collect();
    out.insert("items".into(), Json::Array(items));
    put(
        &mut out,
        "title",
        feed.title.as_ref().map(|t| t.content.clone()),
    );
    put(
        &mut out,
        "description",
        feed.description.as_ref().map(|t| t.content.clone()),
    );
    put(&mut out, "link", page_link(&feed.links));
    put(
        &mut out,
        "feedUrl",
        feed.links
            .iter()
            .find(|l| l.rel.as_deref() == Some("self"))
            .map(|l| l.href.clone()),
    );
    put(&mut out, "lastBuildDate", rfc2822!(feed.updated));
    put(&mut out, "pubDate", rfc2822!(feed.published));
    put(&mut out, "language", feed.language.clone());
    put(
        &mut out,
        "copyright",
        feed.rights.as_ref().map(|t| t.content.clone()),
    );
    put(
        &mut out,
        "generator",
        feed.generator.as_ref().map(|g| g.content.clone()),
    );
    put(&mut out, "ttl", feed.ttl.map(|t| t.to_string()));
    if let Some(logo) = &feed.logo {
        let mut image = Map::new();
        put(&mut image, "url", Some(logo.uri.clone()));
        put(&mut image, "title", logo.title.clone());
        put(
            &mut image,
            "link",
            logo.link.as_ref().map(|l| l.href.clone()),
        );
        out.insert("image".into(), Json::Object(image));
    }
    Json::Object(out)
}

fn person_name(p: &Person) -> Option<String> {
    p.name.clone().or_else(|| p.email.clone())
}

fn entry_json(entry: &Entry, kind: &FeedType) -> Json {
    let mut out = Map::new();
    let atom = matches!(kind, FeedType::Atom);
    put(
        &mut out,
        "title",
        entry.title.as_ref().map(|t| t.content.clone()),
    );
    put(&mut out, "link", page_link(&entry.links));
    let date = entry.published.or(entry.updated);
    put(&mut out, "pubDate", rfc2822!(date));
    let summary = entry.summary.as_ref().map(|t| t.content.clone());
    let body = entry.content.as_ref().and_then(|c| c.body.clone());
    // RSS: `content` is the description and `content:encoded` stands beside it; Atom: `content`
    // is the entry's content, or its summary without one.
    let (content, encoded) = if atom {
        (body.or(summary.clone()), None)
    } else {
        (summary.clone(), body)
    };
    if let Some(c) = content.filter(|c| !c.is_empty()) {
        put(&mut out, "contentSnippet", Some(snippet(&c)));
        out.insert("content".into(), Json::String(c));
    }
    if let Some(e) = encoded.filter(|e| !e.is_empty()) {
        put(&mut out, "content:encodedSnippet", Some(snippet(&e)));
        out.insert("content:encoded".into(), Json::String(e));
    }
    if atom {
        put(&mut out, "summary", summary);
        put(&mut out, "id", Some(entry.id.clone()));
    } else {
        put(&mut out, "guid", Some(entry.id.clone()));
    }
    let by_role = |role: &str| {
        entry
            .authors
            .iter()
            .find(|p| p.role.as_deref() == Some(role))
            .and_then(person_name)
    };
    put(&mut out, "creator", by_role("creator"));
    let author = by_role("author").or_else(|| {
        entry
            .authors
            .iter()
            .find(|p| p.role.as_deref() != Some("creator"))
            .and_then(person_name)
    });
    put(&mut out, "author", author);
    if !entry.categories.is_empty() {
        let terms = entry
            .categories
            .iter()
            .map(|c| Json::String(c.label.clone().unwrap_or_else(|| c.term.clone())))
            .collect();
        out.insert("categories".into(), Json::Array(terms));
    }
    put(&mut out, "isoDate", iso!(date));
    Json::Object(out)
}

/// HTML as plain text: tags dropped (block-level ones leave a line break), entities decoded,
/// ends trimmed.
fn snippet(html: &str) -> String {
    const BLOCKS: &[&str] = &[
        "p",
        "br",
        "div",
        "li",
        "ul",
        "ol",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "blockquote",
        "tr",
        "table",
        "section",
    ];
    let mut text = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        text.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('>') else {
            rest = &rest[start..];
            break;
        };
        let tag = &rest[start + 1..start + len];
        let name = tag
            .trim_start_matches('/')
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        if BLOCKS.contains(&name.as_str()) && !text.ends_with('\n') && !text.is_empty() {
            text.push('\n');
        }
        rest = &rest[start + len + 1..];
    }
    text.push_str(rest);
    let decoded = quick_xml::escape::unescape_with(&text, quick_xml::escape::resolve_html5_entity)
        .map(|c| c.into_owned())
        .unwrap_or(text);
    decoded.trim().to_string()
}

/// The HTTP rules (shared with `fetch`) behind every run's parsers.
pub struct RssService {
    fetch: Arc<FetchService>,
}

impl RssService {
    pub fn new(fetch: Arc<FetchService>) -> Self {
        RssService { fetch }
    }

    fn parse_url(&self, args: Vec<Json>) -> HostCall {
        let url = match args.first() {
            Some(Json::String(u)) => u.clone(),
            _ => {
                return HostCall::Ready(Err(HostError::type_error(
                    "rss-parser: parseURL(url): the URL must be a string",
                )))
            }
        };
        let parsed = match reqwest::Url::parse(&url) {
            Ok(u) => u,
            Err(e) => return HostCall::Ready(Err(rss_error(format!("invalid URL '{url}': {e}")))),
        };
        if let Some(why) = self.fetch.refuse(&parsed) {
            return HostCall::Ready(Err(rss_error(format!("{url}: {why}"))));
        }
        let options = match args.get(1) {
            Some(Json::Object(o)) => o.clone(),
            _ => Map::new(),
        };
        let timeout = match options.get("timeout").and_then(Json::as_f64) {
            Some(ms) if ms.is_finite() && ms > 0.0 => {
                Duration::from_millis(ms.min(self.fetch.timeout().as_millis() as f64) as u64)
                    .max(Duration::from_millis(1))
            }
            _ => self.fetch.timeout(),
        };
        let mut request = self
            .fetch
            .client()
            .get(parsed)
            .timeout(timeout)
            .header("user-agent", USER_AGENT)
            .header("accept", ACCEPT);
        if let Some(Json::Object(headers)) = options.get("headers") {
            for (k, v) in headers {
                let value = match v {
                    Json::String(s) => s.clone(),
                    other => other.to_string(),
                };
                request = request.header(k.as_str(), value);
            }
        }
        let max = self.fetch.max_bytes();
        HostCall::Pending(Box::pin(async move {
            let work = async {
                let response = request.send().await.map_err(|e| {
                    if e.is_timeout() {
                        format!("timed out after {} ms", timeout.as_millis())
                    } else {
                        error_chain(&e)
                    }
                })?;
                let status = response.status();
                if !status.is_success() {
                    return Err(format!("HTTP {}", status.as_u16()));
                }
                let base = response.url().to_string();
                let body = read_capped(response, max).await?;
                parse_feed(&body, Some(&base)).map_err(|e| format!("not a feed: {e}"))
            };
            match tokio::time::timeout(timeout, work).await {
                Err(_) => Err(rss_error(format!(
                    "{url}: timed out after {} ms",
                    timeout.as_millis()
                ))),
                Ok(Err(e)) => Err(rss_error(format!("{url}: {e}"))),
                Ok(Ok(feed)) => Ok(feed),
            }
        }))
    }

    fn parse_string(&self, args: Vec<Json>) -> HostCall {
        let result = match args.first() {
            Some(Json::String(xml)) => parse_feed(xml.as_bytes(), None)
                .map_err(|e| rss_error(format!("parseString: not a feed: {e}"))),
            _ => Err(HostError::type_error(
                "rss-parser: parseString(xml): the XML must be a string",
            )),
        };
        HostCall::Ready(result)
    }
}

/// `require('rss-parser')`.
pub struct RssModule {
    service: Arc<RssService>,
}

impl RssModule {
    pub fn new(service: Arc<RssService>) -> Self {
        RssModule { service }
    }
}

impl HostModule for RssModule {
    fn instantiate(&self) -> Box<dyn HostObject> {
        Box::new(RssObject {
            service: self.service.clone(),
        })
    }
    fn prelude(&self) -> Option<&'static str> {
        Some(PRELUDE)
    }
    /// Only the default export: the class.
    fn exports(&self) -> Option<&'static [&'static str]> {
        Some(&[])
    }
}

struct RssObject {
    service: Arc<RssService>,
}

impl HostObject for RssObject {
    fn methods(&self) -> &[HostMethod] {
        METHODS
    }
    fn call(&self, method: &str, args: Vec<Json>) -> HostCall {
        match method {
            "parseURL" => self.service.parse_url(args),
            "parseString" => self.service.parse_string(args),
            other => HostCall::Ready(Err(HostError::type_error(format!(
                "rss-parser has no method '{other}'"
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSS: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:atom="http://www.w3.org/2005/Atom">
  <channel>
    <title>Station news</title>
    <description>What happened</description>
    <link>https://news.example.com/</link>
    <atom:link href="https://news.example.com/rss.xml" rel="self" type="application/rss+xml"/>
    <lastBuildDate>Sun, 06 Dec 2026 03:00:00 GMT</lastBuildDate>
    <item>
      <title>First &amp; foremost</title>
      <link>https://news.example.com/1</link>
      <description>&lt;p&gt;Line one&lt;/p&gt;&lt;p&gt;Fish &amp;amp; chips&amp;nbsp;today&lt;/p&gt;</description>
      <guid isPermaLink="false">item-1</guid>
      <pubDate>Sun, 06 Dec 2026 02:30:00 GMT</pubDate>
      <dc:creator>Ada</dc:creator>
      <category>Local</category>
      <category>Weather</category>
    </item>
    <item>
      <title>Second</title>
      <link>https://news.example.com/2</link>
    </item>
  </channel>
</rss>"#;

    #[test]
    fn rss2_becomes_the_npm_shape() {
        let feed = parse_feed(RSS.as_bytes(), None).unwrap();
        assert_eq!(feed["title"], "Station news");
        assert_eq!(feed["description"], "What happened");
        assert_eq!(feed["link"], "https://news.example.com/");
        assert_eq!(feed["feedUrl"], "https://news.example.com/rss.xml");
        assert_eq!(feed["lastBuildDate"], "Sun, 6 Dec 2026 03:00:00 +0000");
        let items = feed["items"].as_array().unwrap();
        assert_eq!(items.len(), 2);
        let first = &items[0];
        assert_eq!(first["title"], "First & foremost");
        assert_eq!(first["link"], "https://news.example.com/1");
        assert_eq!(first["guid"], "item-1");
        assert_eq!(first["creator"], "Ada");
        assert_eq!(first["isoDate"], "2026-12-06T02:30:00.000Z");
        assert_eq!(first["categories"], serde_json::json!(["Local", "Weather"]));
        assert_eq!(
            first["content"],
            "<p>Line one</p><p>Fish &amp; chips&nbsp;today</p>"
        );
        assert_eq!(first["contentSnippet"], "Line one\nFish & chips\u{a0}today");
        // No guid, no date: the keys are absent, not invented.
        assert!(items[1].get("guid").is_none(), "{}", items[1]);
        assert!(items[1].get("isoDate").is_none(), "{}", items[1]);
    }

    #[test]
    fn malformed_xml_is_an_error() {
        assert!(parse_feed(b"<rss><channel><title>x</channel>", None).is_err());
        assert!(parse_feed(b"not xml at all", None).is_err());
    }

    #[test]
    fn the_prelude_compiles() {
        crate::script::compile("prelude", PRELUDE).unwrap();
    }
}
