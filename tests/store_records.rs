//! Execution records and CDRs through the real binary: written before the answer, so a
//! SIGKILL right after a run loses nothing; listed by time with cursor pagination; exported
//! as JSON lines.

mod support;

use callforge::store::{Cdr, CdrError, Records, Store, Synchronous};
use serde_json::{json, Value};
use support::{start, workdir};

#[tokio::test]
async fn every_run_is_recorded_before_it_is_answered_and_survives_sigkill() {
    let dir = workdir("[records]\njsonl = \"records.jsonl\"\n");
    let mut s = start(dir.path());
    let (status, _) = s.post("/v1/run/hello", json!({"name": "rec"})).await;
    assert_eq!(status, 200);
    let (status, _) = s
        .post(
            "/v1/run/dnc?mode=class4",
            json!({"routing": {"dest_number": "447700900123"}}),
        )
        .await;
    assert_eq!(status, 422);
    let (status, _) = s.post("/v1/drivers/did_driver/list", json!({})).await;
    assert_eq!(status, 200);
    for i in 0..20 {
        let (status, _) = s.post("/v1/run/hello", json!({"name": i})).await;
        assert_eq!(status, 200);
    }
    // SIGKILL the moment the last answer arrived: no graceful shutdown, no flush.
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    drop(s);

    let s = start(dir.path());
    let (status, page) = s.get("/v1/executions?limit=1000").await;
    assert_eq!(status, 200, "{page}");
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 23, "{page}");
    assert_eq!(page["next"], Value::Null);
    assert_eq!(items[0]["script"], "hello");
    assert_eq!(items[0]["mode"], "app");
    assert_eq!(items[0]["ok"], true);
    assert_eq!(
        items[0]["result"],
        json!({"hello": "rec", "script": "hello"})
    );
    assert_eq!(items[1]["script"], "dnc");
    assert_eq!(items[1]["mode"], "class4");
    assert_eq!(items[1]["ok"], false);
    assert_eq!(items[1]["code"], 604);
    assert_eq!(items[1]["message"], "Number on DNC List");
    assert_eq!(items[2]["mode"], "driver");
    assert_eq!(items[2]["function"], "list");
    assert!(items[2]["duration_us"].as_u64().unwrap() > 0);
    assert_eq!(
        items[22]["result"]["hello"], 19,
        "the last run before the kill is there"
    );
    let jsonl = std::fs::read_to_string(dir.path().join("records.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), 23);
    let first: Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
    assert_eq!(first["kind"], "execution");
    assert_eq!(first["record"]["script"], "hello");

    // Pages follow the cursor; the time window filters.
    let (_, p1) = s.get("/v1/executions?limit=10").await;
    assert_eq!(p1["items"].as_array().unwrap().len(), 10);
    let next = p1["next"].as_i64().unwrap();
    let (_, p2) = s
        .get(&format!("/v1/executions?limit=10&after={next}"))
        .await;
    assert_eq!(p2["items"][0]["id"].as_i64().unwrap(), next + 1);
    let (_, p3) = s
        .get(&format!("/v1/executions?limit=10&after={}", p2["next"]))
        .await;
    assert_eq!(p3["items"].as_array().unwrap().len(), 3);
    assert_eq!(p3["next"], Value::Null);
    let first_at = items[0]["started_at"].as_i64().unwrap();
    let (_, none) = s.get(&format!("/v1/executions?to={first_at}")).await;
    assert_eq!(none["items"], json!([]));
    let (_, later) = s
        .get(&format!("/v1/executions?from={}", first_at + 3_600_000))
        .await;
    assert_eq!(later["items"], json!([]));
    let (status, bad) = s.get("/v1/executions?limit=abc").await;
    assert_eq!(status, 400);
    assert!(
        bad["error"]["message"].as_str().unwrap().contains("limit"),
        "{bad}"
    );
    let (status, bad) = s.get("/v1/executions?form=1").await;
    assert_eq!(status, 400);
    assert!(
        bad["error"]["message"].as_str().unwrap().contains("'form'"),
        "{bad}"
    );
}

fn cdr(call_id: &str, started_at: i64) -> Cdr {
    Cdr {
        call_id: call_id.into(),
        from: "sip:447700900123@carrier".into(),
        to: "sip:4420@callforge".into(),
        script: Some("ivr".into()),
        started_at,
        answered_at: Some(started_at + 1_000),
        ended_at: Some(started_at + 30_000),
        hangup_cause: Some("normal_clearing".into()),
        hangup_side: Some("caller".into()),
        digits: vec!["1".into(), "4420#".into()],
        recordings: vec!["recordings/a.wav".into()],
        legs: vec![json!({"to": "sip:agent@pbx", "answered_at": started_at + 5_000})],
        result: None,
        error: Some(CdrError {
            code: 480,
            message: "Outside hours".into(),
        }),
        ..Cdr::default()
    }
}

#[tokio::test]
async fn cdrs_written_by_the_voice_layer_are_listed_by_time() {
    let dir = workdir("");
    // The voice layer's call: Records::write_cdr on the engine's store (here from another
    // process, before and while the engine runs: WAL lets both at once).
    let records = Records::new(
        Store::open(&dir.path().join("callforge.db"), Synchronous::Normal).unwrap(),
        None,
    )
    .unwrap();
    records.write_cdr(cdr("call-1", 1_000)).await.unwrap();
    let s = start(dir.path());
    records.write_cdr(cdr("call-2", 2_000)).await.unwrap();
    records.write_cdr(cdr("call-3", 3_000)).await.unwrap();
    let (status, page) = s.get("/v1/cdrs?from=1500&to=5000&limit=1").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let item = &page["items"][0];
    assert_eq!(item["call_id"], "call-2");
    assert_eq!(item["digits"], json!(["1", "4420#"]));
    assert_eq!(item["legs"][0]["to"], "sip:agent@pbx");
    assert_eq!(
        item["error"],
        json!({"code": 480, "message": "Outside hours"})
    );
    assert_eq!(item["hangup_side"], "caller");
    let (_, rest) = s
        .get(&format!(
            "/v1/cdrs?from=1500&to=5000&after={}",
            page["next"]
        ))
        .await;
    assert_eq!(rest["items"][0]["call_id"], "call-3");
    assert_eq!(rest["next"], Value::Null);
}

#[tokio::test]
async fn records_can_be_disabled() {
    let dir = workdir("[records]\nenabled = false\n");
    let s = start(dir.path());
    let (status, _) = s.post("/v1/run/hello", json!({})).await;
    assert_eq!(status, 200);
    let (status, body) = s.get("/v1/executions").await;
    assert_eq!(status, 404);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("disabled"));
}
