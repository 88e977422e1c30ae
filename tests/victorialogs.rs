//! The VictoriaLogs harness (tests/support/victorialogs.rs) and the behaviour of the store that the
//! agent's log sinks rely on: what each ingestion API (JSON lines, Elasticsearch `_bulk`, Loki push
//! JSON) stores, with which fields and streams, and how it answers.

#[path = "support/victorialogs.rs"]
mod victorialogs;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::{Value, json};
use victorialogs::{NDJSON, VictoriaLogs, now_nanos, rfc3339_nanos};

const WAIT: Duration = Duration::from_secs(10);
const MINUTE_NS: i64 = 60 * 1_000_000_000;

/// The string value of `field` in `row`, or a panic naming the row.
fn field<'a>(row: &'a Value, field: &str) -> &'a str {
    row.get(field)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("row has no string field {field:?}: {row}"))
}

/// Rows keyed by their `seq` field (every test row carries a distinct one).
fn by_seq(rows: &[Value]) -> BTreeMap<u64, Value> {
    let mut out = BTreeMap::new();
    for row in rows {
        let seq: u64 = field(row, "seq").parse().expect("numeric seq");
        assert!(out.insert(seq, row.clone()).is_none(), "seq {seq} twice");
    }
    out
}

#[tokio::test]
async fn harness_serves_health_on_loopback_and_kills_the_store_on_drop() {
    let store = VictoriaLogs::start();
    assert_eq!(store.base_url(), format!("http://127.0.0.1:{}", store.port));
    let health = store.get("/health").await;
    assert_eq!((health.status, health.body.as_str()), (200, "OK"));
    // An empty store answers a query with an empty body: no rows.
    assert!(store.query("*").await.is_empty());
    assert_eq!(store.count("*").await, 0);

    let pid = store.pid();
    let addr = SocketAddr::from(([127, 0, 0, 1], store.port));
    let data_dir = store.dir.path().to_path_buf();
    drop(store);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "victoria-logs (pid {pid}) still exists after drop"
    );
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "{addr} still accepts connections after drop"
    );
    assert!(!data_dir.exists(), "storage dir left behind");
}

#[tokio::test]
async fn force_flush_makes_just_ingested_rows_searchable_at_once() {
    let store = VictoriaLogs::start();
    let rows: Vec<Value> = (0..25)
        .map(|i| json!({"_msg": format!("flush me {i}"), "batch": "flush", "seq": i}))
        .collect();
    let answer = store.insert_jsonline("", &rows).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    store.flush().await;
    // No polling: the flush alone makes all of them visible.
    assert_eq!(store.query("batch:flush").await.len(), 25);
}

#[tokio::test]
async fn jsonline_stores_every_row_with_msg_time_and_stream_fields_named_by_query_params() {
    let store = VictoriaLogs::start();
    let base = now_nanos() - 10 * MINUTE_NS;
    let time_of = |seq: i64| base + seq * 1_000_001; // distinct, with nanosecond digits
    let rows: Vec<Value> = (0..60)
        .map(|seq| {
            json!({
                "log": format!("line {seq}"),
                // Unix nanoseconds as a string; the store infers the unit from the magnitude.
                "ts": time_of(seq).to_string(),
                "host": format!("h{}", seq % 3),
                "file": "/var/log/app.log",
                "seq": seq,
                "level": "info",
            })
        })
        .collect();
    let answer = store
        .insert_jsonline(
            "_msg_field=log&_time_field=ts&_stream_fields=host,file",
            &rows,
        )
        .await;
    assert_eq!((answer.status, answer.body.as_str()), (200, ""));

    let stored = store.wait_for_count("*", 60, WAIT).await;
    assert_eq!(stored.len(), 60);
    let stored = by_seq(&stored);
    assert_eq!(
        stored.keys().copied().collect::<Vec<_>>(),
        (0..60).collect::<Vec<_>>()
    );
    for (seq, row) in &stored {
        let seq = *seq as i64;
        assert_eq!(field(row, "_msg"), format!("line {seq}"));
        assert_eq!(field(row, "_time"), rfc3339_nanos(time_of(seq)));
        assert_eq!(
            field(row, "_stream"),
            format!("{{file=\"/var/log/app.log\",host=\"h{}\"}}", seq % 3)
        );
        assert_eq!(field(row, "host"), format!("h{}", seq % 3));
        assert_eq!(field(row, "file"), "/var/log/app.log");
        assert_eq!(field(row, "level"), "info");
        // The message and time fields are consumed, not kept next to _msg and _time.
        assert!(row.get("log").is_none() && row.get("ts").is_none(), "{row}");
    }
    for host in ["h0", "h1", "h2"] {
        let in_stream = format!("_stream:{{host=\"{host}\",file=\"/var/log/app.log\"}}");
        assert_eq!(store.count(&in_stream).await, 20, "{in_stream}");
    }
}

#[tokio::test]
async fn jsonline_with_a_form_urlencoded_content_type_answers_200_and_stores_nothing() {
    let store = VictoriaLogs::start();
    let lost = json!({"_msg": "sent as a form", "batch": "form"}).to_string() + "\n";
    let answer = store
        .post(
            "/insert/jsonline",
            "application/x-www-form-urlencoded",
            lost,
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let kept = json!({"_msg": "sent as ndjson", "batch": "ndjson"}).to_string() + "\n";
    let answer = store.post("/insert/jsonline", NDJSON, kept).await;
    assert_eq!(answer.status, 200, "{answer:?}");

    store.wait_for_count("batch:ndjson", 1, WAIT).await;
    assert_eq!(store.count("batch:form").await, 0);
    assert_eq!(
        store
            .metric(r#"vl_rows_ingested_total{type="jsonline"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn jsonline_skips_bad_lines_and_answers_400_only_when_every_line_is_bad() {
    let store = VictoriaLogs::start();
    let body = format!(
        "{}\nnot json\n{}\n",
        json!({"_msg": "good", "batch": "mixed", "seq": 1}),
        json!({"_msg": "good", "batch": "mixed", "seq": 2}),
    );
    let answer = store.post("/insert/jsonline", NDJSON, body).await;
    assert_eq!(answer.status, 200, "{answer:?}");

    let answer = store
        .post("/insert/jsonline", NDJSON, "not json\n{broken\n".into())
        .await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.body.contains("cannot parse JSON"), "{answer:?}");

    let rows = store.wait_for_count("batch:mixed", 2, WAIT).await;
    assert_eq!(by_seq(&rows).keys().copied().collect::<Vec<_>>(), [1, 2]);
    assert_eq!(store.count("*").await, 2);
}

#[tokio::test]
async fn elasticsearch_bulk_stores_every_document_flattening_nested_fields_into_strings() {
    let store = VictoriaLogs::start();
    let base = now_nanos() - 5 * MINUTE_NS;
    // Millisecond RFC3339 times, as Elasticsearch clients usually send them.
    let time_of = |seq: i64| (base / 1_000_000 + seq) * 1_000_000;
    let docs: Vec<Value> = (0..40)
        .map(|seq| {
            json!({
                "@timestamp": rfc3339_nanos(time_of(seq)),
                "message": format!("event {seq}"),
                "kubernetes": {"namespace": "ns1", "pod": {"name": format!("p{}", seq % 4)}},
                "seq": seq,
                "ok": true,
                "tags": ["a", "b"],
            })
        })
        .collect();
    let answer = store
        .insert_elasticsearch_bulk(
            "_msg_field=message&_time_field=@timestamp\
             &_stream_fields=kubernetes.namespace,kubernetes.pod.name",
            &docs,
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let reply: Value = serde_json::from_str(&answer.body).expect("bulk answer is JSON");
    assert_eq!(reply["errors"], json!(false), "{reply}");
    let items = reply["items"].as_array().expect("items array");
    assert_eq!(items.len(), 40);
    assert!(
        items
            .iter()
            .all(|item| item == &json!({"create": {"status": 201}})),
        "{reply}"
    );

    let stored = by_seq(&store.wait_for_count("*", 40, WAIT).await);
    assert_eq!(stored.len(), 40);
    for (seq, row) in &stored {
        let seq = *seq as i64;
        assert_eq!(field(row, "_msg"), format!("event {seq}"));
        assert_eq!(field(row, "_time"), rfc3339_nanos(time_of(seq)));
        assert_eq!(field(row, "kubernetes.namespace"), "ns1");
        assert_eq!(field(row, "kubernetes.pod.name"), format!("p{}", seq % 4));
        assert_eq!(
            field(row, "_stream"),
            format!(
                "{{kubernetes.namespace=\"ns1\",kubernetes.pod.name=\"p{}\"}}",
                seq % 4
            )
        );
        assert_eq!(field(row, "ok"), "true");
        assert_eq!(field(row, "tags"), r#"["a","b"]"#);
        assert!(row.get("message").is_none() && row.get("@timestamp").is_none());
    }
    for pod in 0..4 {
        assert_eq!(
            store.count(&format!("kubernetes.pod.name:=p{pod}")).await,
            10
        );
    }
}

#[tokio::test]
async fn elasticsearch_bulk_stops_at_the_first_bad_document_and_keeps_the_ones_before_it() {
    let store = VictoriaLogs::start();
    // Both action kinds are accepted; the index name is ignored.
    let body = [
        r#"{"create":{}}"#,
        r#"{"_msg":"first","batch":"partial","seq":1}"#,
        r#"{"index":{"_index":"logs-outrider"}}"#,
        r#"{"_msg":"second","batch":"partial","seq":2}"#,
        r#"{"create":{}}"#,
        r#"not json"#,
        r#"{"create":{}}"#,
        r#"{"_msg":"after the bad one","batch":"partial","seq":3}"#,
    ]
    .join("\n")
        + "\n";
    let path = "/insert/elasticsearch/_bulk";
    let answer = store.post(path, NDJSON, body.clone()).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(
        answer.body.contains("cannot decode log message #2"),
        "{answer:?}"
    );
    let rows = store.wait_for_count("batch:partial", 2, WAIT).await;
    assert_eq!(by_seq(&rows).keys().copied().collect::<Vec<_>>(), [1, 2]);

    // Retrying the same batch stores the good prefix again: duplicates, not idempotence.
    let answer = store.post(path, NDJSON, body).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    let rows = store.wait_for_count("batch:partial", 4, WAIT).await;
    assert_eq!(rows.len(), 4);
    assert_eq!(store.count("seq:=3").await, 0);
}

#[tokio::test]
async fn loki_push_json_labels_become_stream_fields_and_structured_metadata_becomes_plain_fields() {
    let store = VictoriaLogs::start();
    let base = now_nanos() - 3 * MINUTE_NS;
    let time_of = |seq: i64| base + seq * 1_001;
    let a: Vec<Value> = (0..30)
        .map(|seq| json!([time_of(seq).to_string(), format!("a line {seq}")]))
        .collect();
    let b: Vec<Value> = (30..50)
        .map(|seq| {
            json!([
                time_of(seq).to_string(),
                format!("b line {seq}"),
                {"trace_id": format!("t{seq}")}
            ])
        })
        .collect();
    let push = json!({"streams": [
        {"stream": {"job": "outrider-agent", "host": "h1", "file": "/var/log/a.log"}, "values": a},
        {"stream": {"job": "outrider-agent", "host": "h2", "file": "/var/log/b.log"}, "values": b},
    ]});
    let answer = store.insert_loki_json("", &push).await;
    assert_eq!((answer.status, answer.body.as_str()), (204, ""));

    let rows = store
        .wait_for_count(r#"_stream:{job="outrider-agent"}"#, 50, WAIT)
        .await;
    assert_eq!(rows.len(), 50);
    for row in &rows {
        let msg = field(row, "_msg");
        let (stream, seq) = msg.split_once(" line ").expect("test message");
        let seq: i64 = seq.parse().expect("seq");
        assert_eq!(field(row, "_time"), rfc3339_nanos(time_of(seq)), "{row}");
        assert_eq!(field(row, "job"), "outrider-agent");
        if stream == "a" {
            assert_eq!(
                field(row, "_stream"),
                r#"{file="/var/log/a.log",host="h1",job="outrider-agent"}"#
            );
            assert!(row.get("trace_id").is_none(), "{row}");
        } else {
            assert_eq!(
                field(row, "_stream"),
                r#"{file="/var/log/b.log",host="h2",job="outrider-agent"}"#
            );
            assert_eq!(field(row, "trace_id"), format!("t{seq}"));
        }
    }
    assert_eq!(store.count(r#"_stream:{host="h1"}"#).await, 30);
    assert_eq!(store.count(r#"_stream:{host="h2"}"#).await, 20);
    assert_eq!(store.count("trace_id:*").await, 20);
}

#[tokio::test]
async fn loki_push_parses_json_lines_into_fields_unless_message_parsing_is_disabled() {
    let store = VictoriaLogs::start();
    let line = r#"{"msg":"disk full","level":"warn"}"#;
    let push =
        |case: &str| json!({"streams": [{"stream": {"case": case}, "values": [["0", line]]}]});
    for (case, params) in [
        ("default", ""),
        ("msg_field", "_msg_field=msg"),
        ("raw", "disable_message_parsing=1"),
    ] {
        let answer = store.insert_loki_json(params, &push(case)).await;
        assert_eq!(answer.status, 204, "{case}: {answer:?}");
    }
    store.wait_for_count("case:*", 3, WAIT).await;

    let default = store.query("case:=default").await;
    assert_eq!(default.len(), 1);
    assert_eq!(field(&default[0], "level"), "warn");
    assert_eq!(field(&default[0], "msg"), "disk full");
    assert!(
        field(&default[0], "_msg").starts_with("missing _msg field"),
        "{}",
        default[0]
    );

    let named = store.query("case:=msg_field").await;
    assert_eq!(named.len(), 1);
    assert_eq!(field(&named[0], "_msg"), "disk full");
    assert_eq!(field(&named[0], "level"), "warn");

    let raw = store.query("case:=raw").await;
    assert_eq!(raw.len(), 1);
    assert_eq!(field(&raw[0], "_msg"), line);
    assert!(raw[0].get("level").is_none(), "{}", raw[0]);
}

#[tokio::test]
async fn loki_push_reads_json_only_with_an_application_json_content_type() {
    let store = VictoriaLogs::start();
    let body = |case: &str| {
        json!({"streams": [{"stream": {"case": case}, "values": [["0", "hello"]]}]}).to_string()
    };
    let path = "/insert/loki/api/v1/push";
    let answer = store.post(path, "text/plain", body("text")).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.body.contains("protobuf"), "{answer:?}");
    let answer = store
        .post(path, "application/json; charset=utf-8", body("charset"))
        .await;
    assert_eq!(answer.status, 204, "{answer:?}");

    store.wait_for_count("case:=charset", 1, WAIT).await;
    assert_eq!(store.count("*").await, 1);
}

#[tokio::test]
async fn rows_outside_the_retention_window_are_dropped_with_a_2xx_answer() {
    let store = VictoriaLogs::start();
    let day = 24 * 60 * MINUTE_NS;
    let now = now_nanos();
    let rows = [
        json!({"_msg": "eight days old", "_time": rfc3339_nanos(now - 8 * day)}),
        json!({"_msg": "three days ahead", "_time": rfc3339_nanos(now + 3 * day)}),
        json!({"_msg": "current", "_time": rfc3339_nanos(now)}),
    ];
    let answer = store.insert_jsonline("", &rows).await;
    assert_eq!(answer.status, 200, "{answer:?}");

    let stored = store.wait_for_count("*", 1, WAIT).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(field(&stored[0], "_msg"), "current");
    assert_eq!(
        store
            .metric(r#"vl_rows_dropped_total{reason="too_small_timestamp"}"#)
            .await,
        1.0
    );
    assert_eq!(
        store
            .metric(r#"vl_rows_dropped_total{reason="too_big_timestamp"}"#)
            .await,
        1.0
    );
}
