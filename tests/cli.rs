//! The `run` and `check` commands, driven as a user would: the real binary, real files.

use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_callforge");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn callforge(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(ROOT)
        .output()
        .expect("run callforge")
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn temp_script(source: &str) -> tempfile::TempPath {
    let file = tempfile::Builder::new().suffix(".js").tempfile().unwrap();
    std::fs::write(file.path(), source).unwrap();
    file.into_temp_path()
}

#[test]
fn run_prints_the_result_and_exits_zero() {
    let out = callforge(&["run", "scripts/legacy.js", "--data", r#"{"a":1}"#]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout_json(&out), json!({"a": 1, "seen": true}));
}

#[test]
fn script_errors_print_code_and_message_and_exit_two() {
    let out = callforge(&[
        "run",
        "scripts/dnc.js",
        "--mode",
        "class4",
        "--data",
        r#"{"routing":{"dest_number":"447700900123"}}"#,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stdout_json(&out),
        json!({"error": {"code": 604, "message": "Number on DNC List"}})
    );
}

#[test]
fn syntax_errors_go_to_stderr_with_line_and_column_and_exit_one() {
    let path = temp_script("function main(data) {\n  return data +;\n}\n");
    let p = path.to_str().unwrap();
    for cmd in ["run", "check"] {
        let out = callforge(&[cmd, p]);
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{p}:2:")), "{cmd}: {err}");
        assert!(err.contains("SyntaxError"), "{cmd}: {err}");
        if cmd == "run" {
            assert!(out.stdout.is_empty());
        }
    }
}

#[test]
fn unreadable_files_and_bad_data_exit_one() {
    let out = callforge(&["run", "no/such/script.js"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
    let out = callforge(&["run", "scripts/hello.js", "--data", "{not json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));
}

#[test]
fn data_comes_from_a_file_or_stdin_and_vars_are_merged() {
    let out = callforge(&[
        "run",
        "scripts/routing.js",
        "--mode",
        "class4",
        "--data-file",
        "tests/data/five_carriers.json",
        "--vars",
        "scripts/routing.toml",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = stdout_json(&out);
    let egress = v["routing"]["egress_routing"].as_array().unwrap();
    let ids: Vec<&str> = egress
        .iter()
        .map(|e| e["gw"].as_object().unwrap().keys().next().unwrap().as_str())
        .collect();
    // charlie is down, delta does not serve 44; the rest cheapest first.
    assert_eq!(ids, ["bravo", "alpha", "echo"]);
    let pool = ["442071234567", "442071234568", "442071234569"];
    for e in egress {
        let cli = e["gw"].as_object().unwrap().values().next().unwrap()["cli"]
            .as_str()
            .unwrap();
        assert!(pool.contains(&cli), "{cli}");
    }

    for flag in ["--data", "--data-file"] {
        let mut child = Command::new(BIN)
            .args(["run", "scripts/hello.js", flag, "-"])
            .current_dir(ROOT)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(br#"{"name":"stdin"}"#)
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            stdout_json(&out),
            json!({"hello": "stdin", "script": "hello"}),
            "{flag}"
        );
    }
}

#[test]
fn drivers_are_the_default_mode_for_driver_scripts() {
    let out = callforge(&["run", "scripts/did_driver.js", "--fn", "list"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout_json(&out),
        json!(["442071000001", "442071000002", "441614000003"])
    );
    let out = callforge(&[
        "run",
        "scripts/did_driver.js",
        "--fn",
        "allocate",
        "--data",
        r#"{"did":"449999"}"#,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stdout_json(&out)["error"]["code"], 404);
}

#[test]
fn routing_outside_hours_is_rejected_with_480() {
    let vars = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(vars.path(), "[schedule]\nopen = 9\nclose = 21\n").unwrap();
    let out = callforge(&[
        "run",
        "scripts/routing.js",
        "--mode",
        "class4",
        "--data",
        r#"{"now":"2026-01-01T03:00:00Z","routing":{"dest_number":"44","egress_routing":[]}}"#,
        "--vars",
        vars.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stdout_json(&out),
        json!({"error": {"code": 480, "message": "Outside opening hours"}})
    );
}

#[test]
fn check_accepts_every_shipped_example() {
    let mut args = vec!["check"];
    let names: Vec<String> = std::fs::read_dir(format!("{ROOT}/scripts"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| format!("scripts/{}", e.file_name().to_string_lossy()))
        .filter(|n| n.ends_with(".js"))
        .collect();
    assert!(names.len() >= 5);
    args.extend(names.iter().map(String::as_str));
    let out = callforge(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
