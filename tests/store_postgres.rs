//! The shared PostgreSQL store against a real server started by the test: records, CDRs and
//! userspace rows round-trip; records acknowledged while the database is down (in memory and
//! spooled to disk) are all written exactly once when it returns, even across a SIGKILL.

mod support;

use std::time::{Duration, Instant};

use callforge::store::{
    Cdr, ExecutionRecord, Outbox, OutboxConfig, PgStore, RecordQuery, Records, Store, Synchronous,
    Userspace,
};
use serde_json::json;
use support::{postgres, start, workdir, Engine};

fn outbox_config(spool: &std::path::Path, memory_limit: usize) -> OutboxConfig {
    OutboxConfig {
        node: "test-node".into(),
        memory_limit,
        spool: spool.to_path_buf(),
        sync_spool: false,
    }
}

fn exec(i: i64) -> ExecutionRecord {
    ExecutionRecord {
        id: 0,
        started_at: 1_000 + i,
        script: format!("s{i}"),
        mode: "class4".into(),
        function: None,
        duration_us: 12,
        ok: i % 2 == 0,
        code: (i % 2 == 1).then_some(604),
        message: (i % 2 == 1).then(|| "Number on DNC List".to_string()),
        result: (i % 2 == 0).then(|| json!({"i": i})),
    }
}

async fn run(engine: &Engine, i: usize) {
    let (status, body) = engine.post("/v1/run/hello", json!({"name": i})).await;
    assert_eq!(status, 200, "run {i}: {body}");
}

/// Poll `f` until it returns true or `limit` passes.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_cdrs_and_userspace_round_trip_through_postgres() {
    let pg = postgres();
    let dir = tempfile::tempdir().unwrap();
    let store = PgStore::connect(&pg.url).unwrap();
    let outbox =
        Outbox::start(store.clone(), outbox_config(&dir.path().join("spool"), 100)).unwrap();
    let records = Records::postgres(store.clone(), outbox, None).unwrap();

    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let records = records.clone();
            tokio::spawn(async move { records.write_execution(exec(i)).await.unwrap() })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        let written = t.await.unwrap();
        assert_eq!(written.script, format!("s{}", written.started_at - 1_000));
        ids.push(written.id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200, "each record has its own id");
    assert!(ids[0] > 0, "committed records carry the database's id");

    let q = RecordQuery {
        from: Some(1_001),
        to: Some(1_004),
        limit: Some(2),
        after: None,
    };
    let first = records.executions(q.clone()).await.unwrap();
    let starts: Vec<i64> = first.items.iter().map(|r| r.started_at).collect();
    assert_eq!(first.items.len(), 2);
    assert!(
        starts.iter().all(|s| (1_001..1_004).contains(s)),
        "{starts:?}"
    );
    let second = records
        .executions(RecordQuery {
            after: first.next,
            ..q
        })
        .await
        .unwrap();
    assert_eq!(second.items.len(), 1);
    assert_eq!(second.next, None);
    let failed = first
        .items
        .iter()
        .chain(&second.items)
        .find(|r| r.started_at == 1_001)
        .unwrap();
    assert_eq!(failed.code, Some(604));
    assert_eq!(failed.message.as_deref(), Some("Number on DNC List"));

    let cdr = Cdr {
        call_id: "abc@host".into(),
        from: "sip:alice@a".into(),
        to: "sip:bob@b".into(),
        script: Some("ivr".into()),
        started_at: 5,
        answered_at: Some(6),
        ended_at: Some(9),
        hangup_cause: Some("normal_clearing".into()),
        hangup_side: Some("caller".into()),
        digits: vec!["12#".into()],
        recordings: vec!["recordings/abc.wav".into()],
        legs: vec![json!({"to": "sip:carrier", "cause": "200"})],
        result: Some(json!("done")),
        error: Some(callforge::store::CdrError {
            code: 480,
            message: "closed".into(),
        }),
        ..Cdr::default()
    };
    let written = records.write_cdr(cdr.clone()).await.unwrap();
    assert!(written.id > 0);
    let page = records.cdrs(RecordQuery::default()).await.unwrap();
    assert_eq!(page.items, vec![written.clone()]);
    assert_eq!(Cdr { id: 0, ..written }, cdr);
    assert_eq!(pg.psql("SELECT node FROM cdrs"), "test-node");

    // A NUL (PostgreSQL text cannot hold one) is written as U+FFFD, not refused.
    let mut nul = exec(500);
    nul.message = Some("bad\0byte".into());
    let written = records.write_execution(nul).await.unwrap();
    assert_eq!(
        pg.psql(&format!(
            "SELECT message FROM executions WHERE id = {}",
            written.id
        )),
        "bad\u{FFFD}byte"
    );
    // A record the database refuses fails alone: the others of its batch are committed.
    pg.psql("ALTER TABLE executions ADD CONSTRAINT no_poison CHECK (script <> 'poison')");
    let tasks: Vec<_> = (600..700)
        .map(|i| {
            let records = records.clone();
            let mut r = exec(i);
            if i == 650 {
                r.script = "poison".into();
            }
            tokio::spawn(async move { records.write_execution(r).await })
        })
        .collect();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => assert!(r.id > 0 && r.script != "poison"),
            Err(e) => {
                assert!(e.to_string().contains("no_poison"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 1);
    assert_eq!(
        pg.psql("SELECT COUNT(*) FROM executions WHERE started_at >= 1600 AND started_at < 1700"),
        "99"
    );

    // Userspace: a second store on the same database (another engine) sees the same rows.
    let sqlite = Store::lazy(&dir.path().join("unused.db"), Synchronous::Normal);
    let a = Userspace::postgres(sqlite.clone(), store);
    let b = Userspace::postgres(sqlite, PgStore::connect(&pg.url).unwrap());
    a.create("dnc".into(), "44".into(), json!({"why": "asked"}))
        .await
        .unwrap();
    let e = b
        .create("dnc".into(), "44".into(), json!(null))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already has"), "{e}");
    assert_eq!(
        b.read("dnc".into(), "44".into()).await.unwrap(),
        Some(json!({"why": "asked"}))
    );
    b.update("dnc".into(), "44".into(), json!(1)).await.unwrap();
    assert_eq!(
        a.read("dnc".into(), "44".into()).await.unwrap(),
        Some(json!(1))
    );
    assert!(a
        .update("dnc".into(), "45".into(), json!(null))
        .await
        .is_err());
    assert_eq!(b.list("dnc".into()).await.unwrap(), vec!["44"]);
    assert!(a.delete("dnc".into(), "44".into()).await.unwrap());
    assert_eq!(b.read("dnc".into(), "44".into()).await.unwrap(), None);
    assert!(
        !std::fs::read_dir(dir.path().join("unused.db").parent().unwrap())
            .unwrap()
            .any(|e| e.unwrap().file_name() == "unused.db"),
        "the SQLite file is not created when PostgreSQL holds the rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_then_up_loses_no_acknowledged_record() {
    let pg = postgres();
    let dir = workdir(&format!(
        "[store]\nurl = \"{}\"\nqueue_memory = 5\nspool = \"spool\"\nnode = \"engine-a\"\n",
        pg.url
    ));
    let mut engine = start(dir.path());
    for i in 0..10 {
        run(&engine, i).await;
    }
    assert_eq!(pg.psql("SELECT COUNT(*) FROM executions"), "10");

    // The database goes away: runs are still answered (acknowledged as queued), the first 5
    // waiting in memory and the rest spooled to disk.
    pg.stop();
    let down = Instant::now();
    for i in 10..30 {
        run(&engine, i).await;
    }
    assert!(
        down.elapsed() < Duration::from_secs(10),
        "runs were held up by the outage: {:?}",
        down.elapsed()
    );
    let spooled = || {
        std::fs::read_dir(dir.path().join("spool"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| std::fs::read_to_string(e.path()).unwrap().lines().count())
            .sum::<usize>()
    };
    assert_eq!(
        spooled(),
        15,
        "beyond queue_memory = 5, records wait on disk"
    );

    pg.start();
    let replayed = wait_until(Duration::from_secs(20), || {
        pg.psql("SELECT COUNT(*) FROM executions") == "30"
    });
    assert!(
        replayed,
        "after the outage: {} rows",
        pg.psql("SELECT COUNT(*) FROM executions")
    );
    assert!(
        wait_until(Duration::from_secs(5), || spooled() == 0),
        "spool emptied"
    );
    // Exactly once, each run once: the names 0..30 each appear a single time.
    assert_eq!(
        pg.psql("SELECT COUNT(DISTINCT uid), COUNT(DISTINCT result), MIN(node), MAX(node) FROM executions"),
        "30|30|engine-a|engine-a"
    );

    // Down again, and the engine is killed while records wait: with queue_memory = 0 every
    // acknowledged record is on disk, and the next start replays it.
    std::fs::write(
        dir.path().join("callforge.toml"),
        format!(
            "[store]\nurl = \"{}\"\nqueue_memory = 0\nspool = \"spool\"\nnode = \"engine-a\"\n",
            pg.url
        ),
    )
    .unwrap();
    engine.child.kill().unwrap();
    engine.child.wait().unwrap();
    drop(engine);
    engine = start(dir.path());
    pg.stop();
    for i in 30..40 {
        run(&engine, i).await;
    }
    engine.child.kill().unwrap();
    engine.child.wait().unwrap();
    drop(engine);
    assert_eq!(spooled(), 10);
    pg.start();
    let engine = start(dir.path());
    let replayed = wait_until(Duration::from_secs(20), || {
        pg.psql("SELECT COUNT(*) FROM executions") == "40"
    });
    assert!(
        replayed,
        "after the kill: {} rows",
        pg.psql("SELECT COUNT(*) FROM executions")
    );
    assert_eq!(
        pg.psql("SELECT COUNT(DISTINCT result) FROM executions"),
        "40"
    );
    let (status, page) = engine.get("/v1/executions?limit=1000").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 40);
}
