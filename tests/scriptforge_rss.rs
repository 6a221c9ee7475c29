//! The `rss-parser` host module through the real binary over HTTP: the published `rss-feed.js`
//! example (our own-words equivalent in `tests/fixtures/scriptforge/`, or the published script
//! via `CALLFORGE_SCRIPTFORGE_DIR`) reads its hard-coded BBC URL from a feed server started
//! here on loopback, reached through `[fetch] resolve`. Also: a host outside `[fetch] allow` is
//! refused, malformed XML rejects with `RssError`, and `fetch`/`cxRest` follow `resolve` too.

mod scriptforge_examples;
mod support;

use scriptforge_examples::source as scriptforge_source;
use std::sync::{Arc, Mutex};

use axum::{
    http::{header, HeaderMap, StatusCode, Uri},
    response::IntoResponse,
    Router,
};
use serde_json::{json, Value};
use support::{start, workdir, Engine};

const FEED: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0" xmlns:atom="http://www.w3.org/2005/Atom" xmlns:dc="http://purl.org/dc/elements/1.1/">
  <channel>
    <title>Loopback News - Home</title>
    <description>Loopback News - Top stories</description>
    <link>https://www.loopback.example/news</link>
    <atom:link href="https://feeds.bbci.co.uk/news/rss.xml" rel="self" type="application/rss+xml"/>
    <lastBuildDate>Sun, 06 Dec 2026 04:00:00 GMT</lastBuildDate>
    <item>
      <title>Exchange opens new routes</title>
      <description>&lt;b&gt;Three&lt;/b&gt; carriers join &amp;amp; more</description>
      <link>https://www.loopback.example/news/1</link>
      <guid isPermaLink="false">news-1</guid>
      <pubDate>Sun, 06 Dec 2026 03:15:00 GMT</pubDate>
      <category>Business</category>
    </item>
    <item>
      <title>Storm warning for the coast</title>
      <description>Winds up to 80 mph</description>
      <link>https://www.loopback.example/news/2</link>
      <guid isPermaLink="false">news-2</guid>
      <pubDate>Sun, 06 Dec 2026 02:00:00 GMT</pubDate>
      <dc:creator>Weather desk</dc:creator>
    </item>
    <item>
      <title>Local team wins the cup</title>
      <link>https://www.loopback.example/news/3</link>
      <guid isPermaLink="false">news-3</guid>
    </item>
  </channel>
</rss>"#;

/// Each request the feed server saw: its Host header and path.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A feed server on loopback: the RSS document at `/news/rss.xml`, broken XML at `/bad.xml`,
/// a JSON answer under `/api/cp/` (for cxRest), 404 elsewhere.
async fn feed_server() -> (u16, Seen) {
    let seen: Seen = Default::default();
    let log = seen.clone();
    let app = Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
        let log = log.clone();
        async move {
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            log.lock().unwrap().push((host, uri.path().to_string()));
            let xml = [(header::CONTENT_TYPE, "application/rss+xml")];
            match uri.path() {
                "/news/rss.xml" => (StatusCode::OK, xml, FEED.to_string()).into_response(),
                "/bad.xml" => (
                    StatusCode::OK,
                    xml,
                    "<rss version=\"2.0\"><channel><title>Half</channel>".to_string(),
                )
                    .into_response(),
                p if p.starts_with("/api/cp/") => (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"via": "rest"}"#.to_string(),
                )
                    .into_response(),
                _ => StatusCode::NOT_FOUND.into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, seen)
}

fn engine(config: &str) -> (tempfile::TempDir, Engine) {
    let dir = workdir(config);
    let s = start(dir.path());
    s.put_script("rss-feed", &scriptforge_source("rss-feed"));
    (dir, s)
}

fn error_text(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn the_rss_feed_example_returns_the_parsed_feed() {
    let (port, seen) = feed_server().await;
    let (_dir, s) = engine(&format!(
        "[fetch]\nallow = [\"feeds.bbci.co.uk\"]\n\
         resolve = {{ \"feeds.bbci.co.uk\" = \"127.0.0.1:{port}\" }}\n"
    ));
    let (status, body) = s.post("/v1/run/rss-feed?mode=app", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let feed = &body["result"];
    assert_eq!(feed["title"], "Loopback News - Home", "{feed}");
    assert_eq!(feed["description"], "Loopback News - Top stories");
    assert_eq!(feed["link"], "https://www.loopback.example/news");
    assert_eq!(feed["feedUrl"], "https://feeds.bbci.co.uk/news/rss.xml");
    assert!(
        feed["lastBuildDate"]
            .as_str()
            .unwrap_or_default()
            .contains("Dec 2026 04:00:00"),
        "{feed}"
    );
    let items = feed["items"].as_array().expect("items");
    assert_eq!(items.len(), 3, "{feed}");
    let titles: Vec<&str> = items.iter().filter_map(|i| i["title"].as_str()).collect();
    assert_eq!(
        titles,
        [
            "Exchange opens new routes",
            "Storm warning for the coast",
            "Local team wins the cup"
        ]
    );
    let links: Vec<&str> = items.iter().filter_map(|i| i["link"].as_str()).collect();
    assert_eq!(
        links,
        (1..=3)
            .map(|n| format!("https://www.loopback.example/news/{n}"))
            .collect::<Vec<_>>()
    );
    let first = &items[0];
    assert_eq!(first["guid"], "news-1");
    assert_eq!(first["isoDate"], "2026-12-06T03:15:00.000Z");
    assert_eq!(first["content"], "<b>Three</b> carriers join &amp; more");
    assert_eq!(first["contentSnippet"], "Three carriers join & more");
    assert_eq!(first["categories"], json!(["Business"]));
    assert_eq!(items[1]["creator"], "Weather desk");
    // The request went to the loopback server, under the script's own host name.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [("feeds.bbci.co.uk".to_string(), "/news/rss.xml".to_string())]
    );
}

#[tokio::test]
async fn a_host_outside_the_allow_list_is_refused() {
    let (port, seen) = feed_server().await;
    // resolve alone does not open a host: the allow-list still decides.
    let (_dir, s) = engine(&format!(
        "[fetch]\nallow = [\"127.0.0.1\"]\n\
         resolve = {{ \"feeds.bbci.co.uk\" = \"127.0.0.1:{port}\" }}\n"
    ));
    let (status, body) = s.post("/v1/run/rss-feed?mode=app", json!({})).await;
    assert_ne!(status, 200, "{body}");
    let message = error_text(&body);
    assert!(
        message.contains("RssError")
            && message.contains("feeds.bbci.co.uk:80")
            && message.contains("not in [fetch] allow"),
        "{body}"
    );
    assert!(seen.lock().unwrap().is_empty(), "no request was sent");
}

#[tokio::test]
async fn malformed_xml_rejects_with_rss_error_and_fetch_and_cxrest_follow_resolve() {
    let (port, seen) = feed_server().await;
    let (_dir, s) = engine(&format!(
        "[fetch]\nallow = [\"feeds.bbci.co.uk\", \"api.connexcs.test\"]\n\
         resolve = {{ \"feeds.bbci.co.uk\" = \"127.0.0.1:{port}\", \"api.connexcs.test\" = \"127.0.0.1:{port}\" }}\n\
         [rest]\nurl = \"http://api.connexcs.test/api/cp\"\n[rest.users.\"u\"]\npassword = \"pw\"\n"
    ));
    s.put_script(
        "rss-errors",
        r#"
        const Parser = require('rss-parser');
        async function main() {
            const parser = new Parser({ timeout: 2000 });
            const out = {};
            const attempt = async (k, f) => {
                try { await f(); out[k] = 'resolved'; } catch (e) { out[k] = e.name + ': ' + e.message; }
            };
            await attempt('badUrl', () => parser.parseURL('http://feeds.bbci.co.uk/bad.xml'));
            await attempt('badString', () => parser.parseString('<rss><channel><title>x</channel>'));
            await attempt('missing', () => parser.parseURL('http://feeds.bbci.co.uk/nothing.xml'));
            out.good = (await parser.parseString('<rss version="2.0"><channel><title>Inline</title><item><title>a</title></item></channel></rss>')).items.length;
            out.fetched = await (await fetch('http://feeds.bbci.co.uk/news/rss.xml')).text();
            out.rest = await require('cxRest').auth('u').get('customer');
            return out;
        }"#,
    );
    let (status, body) = s.post("/v1/run/rss-errors?mode=app", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let r = &body["result"];
    let text = |k: &str| r[k].as_str().unwrap_or_default().to_string();
    assert!(
        text("badUrl")
            .starts_with("RssError: rss-parser: http://feeds.bbci.co.uk/bad.xml: not a feed"),
        "{r}"
    );
    assert!(
        text("badString").starts_with("RssError: rss-parser: parseString: not a feed"),
        "{r}"
    );
    assert!(text("missing").starts_with("RssError:"), "{r}");
    assert!(text("missing").contains("HTTP 404"), "{r}");
    assert_eq!(r["good"], 1);
    assert_eq!(r["fetched"], FEED, "fetch reached the loopback server");
    assert_eq!(r["rest"], json!({"via": "rest"}), "cxRest too");
    let hosts: Vec<String> = seen.lock().unwrap().iter().map(|s| s.0.clone()).collect();
    assert_eq!(
        hosts,
        [
            "feeds.bbci.co.uk",
            "feeds.bbci.co.uk",
            "feeds.bbci.co.uk",
            "api.connexcs.test"
        ]
    );
}

#[tokio::test]
async fn a_bad_resolve_entry_stops_startup() {
    let dir = workdir("[fetch]\nresolve = { \"feeds.bbci.co.uk\" = \"localhost\" }\n");
    let err = support::try_start(dir.path()).err().expect("startup fails");
    assert!(err.contains("[fetch]: resolve: feeds.bbci.co.uk"), "{err}");
}
