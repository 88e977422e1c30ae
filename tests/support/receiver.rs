//! A small fault-injecting log receiver for the agent's integration tests (tests only).
//!
//! It speaks the three HTTP protocols the agent ships with — NDJSON POST (`/ingest`),
//! Elasticsearch `_bulk` and the Loki push API — stores what it accepted, and can be told
//! to fail: whole requests (any status, e.g. 503 to play "down"), or per `_bulk` item by
//! the record's message (`busy` → 429 the first time, `reject` → 400, `exists` → 409).
//! It runs on its own runtime thread, so tests stay plain synchronous code.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::Value;

/// What the receiver saw and accepted.
#[derive(Default)]
pub struct Seen {
    /// Records accepted, in arrival order.
    pub records: Vec<Value>,
    /// Loki streams' label sets, one per accepted entry (same order as `records`).
    pub loki_labels: Vec<HashMap<String, String>>,
    /// Every request, accepted or not.
    pub requests: usize,
    /// Messages of the items of every `_bulk` request, per request.
    pub bulk_requests: Vec<Vec<String>>,
    /// Statuses answered to whole requests, in order.
    pub statuses: Vec<u16>,
    /// `Authorization` header of every request (None when absent).
    pub authorization: Vec<Option<String>>,
    /// `Content-Encoding` header of every request.
    pub encodings: Vec<Option<String>>,
}

#[derive(Default)]
struct Inner {
    seen: Seen,
    /// Answer this status to every request while set.
    fail_with: Option<u16>,
    /// Answer this status to the next N requests.
    fail_next: Vec<u16>,
    /// `_bulk` ids already stored (a second `create` answers 409).
    ids: HashSet<String>,
    /// `_bulk` ids already answered 429 once.
    busy_seen: HashSet<String>,
}

/// The running receiver; dropped with the test.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl Receiver {
    pub fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let (tx, rx) = std::sync::mpsc::channel();
        let state = inner.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let app = Router::new()
                    .route("/ingest", post(ingest))
                    .route("/_bulk", post(bulk))
                    .route("/loki/api/v1/push", post(loki))
                    .with_state(state);
                axum::serve(listener, app).await.unwrap();
            });
        });
        let addr = rx.recv().unwrap();
        Self { addr, inner }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Fails every request with `status` until [`Receiver::heal`].
    pub fn fail_all(&self, status: u16) {
        self.inner.lock().unwrap().fail_with = Some(status);
    }

    pub fn heal(&self) {
        self.inner.lock().unwrap().fail_with = None;
    }

    /// Fails the next requests with these statuses, one each.
    pub fn fail_next(&self, statuses: &[u16]) {
        self.inner.lock().unwrap().fail_next = statuses.to_vec();
    }

    pub fn with<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.inner.lock().unwrap().seen)
    }

    pub fn record_count(&self) -> usize {
        self.with(|s| s.records.len())
    }

    pub fn requests(&self) -> usize {
        self.with(|s| s.requests)
    }

    /// Messages of every accepted record.
    pub fn messages(&self) -> Vec<String> {
        self.with(|s| {
            s.records
                .iter()
                .map(|r| r["message"].as_str().unwrap_or_default().to_string())
                .collect()
        })
    }
}

/// Records the headers and returns the body, gunzipped when it says so.
fn note(inner: &mut Inner, headers: &HeaderMap, body: Bytes) -> Vec<u8> {
    let get = |h: &str| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    inner.seen.authorization.push(get("authorization"));
    let enc = get("content-encoding");
    inner.seen.encodings.push(enc.clone());
    if enc.as_deref() == Some("gzip") {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .expect("valid gzip body");
        out
    } else {
        body.to_vec()
    }
}

/// Returns the status to answer if the request is to fail as a whole.
fn whole_request_fault(inner: &mut Inner) -> Option<u16> {
    inner.seen.requests += 1;
    let status = inner
        .fail_with
        .or_else(|| (!inner.fail_next.is_empty()).then(|| inner.fail_next.remove(0)));
    if let Some(s) = status {
        inner.seen.statuses.push(s);
    }
    status
}

async fn ingest(State(s): State<Arc<Mutex<Inner>>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mut inner = s.lock().unwrap();
    let body = note(&mut inner, &headers, body);
    if let Some(code) = whole_request_fault(&mut inner) {
        return StatusCode::from_u16(code).unwrap();
    }
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_slice(line).expect("agent sent invalid NDJSON");
        inner.seen.records.push(v);
    }
    inner.seen.statuses.push(200);
    StatusCode::OK
}

async fn bulk(
    State(s): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let mut inner = s.lock().unwrap();
    let body = note(&mut inner, &headers, body);
    if let Some(code) = whole_request_fault(&mut inner) {
        return (StatusCode::from_u16(code).unwrap(), "{}".into());
    }
    let lines: Vec<&[u8]> = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        lines.len() % 2,
        0,
        "_bulk body must be action/document pairs"
    );
    let mut items = Vec::new();
    let mut messages = Vec::new();
    let mut errors = false;
    for pair in lines.chunks(2) {
        let action: Value = serde_json::from_slice(pair[0]).unwrap();
        let doc: Value = serde_json::from_slice(pair[1]).unwrap();
        let create = &action["create"];
        let id = create["_id"].as_str().expect("create with _id").to_string();
        assert!(create["_index"].is_string());
        let msg = doc["message"].as_str().unwrap_or_default().to_string();
        messages.push(msg.clone());
        let status = if inner.ids.contains(&id) || msg.contains("exists") {
            409
        } else if msg.contains("reject") {
            400
        } else if msg.contains("busy") && inner.busy_seen.insert(id.clone()) {
            429
        } else {
            inner.ids.insert(id.clone());
            inner.seen.records.push(doc);
            201
        };
        if status >= 300 {
            errors = true;
        }
        let mut item = serde_json::json!({"_id": id, "status": status});
        if status >= 300 {
            item["error"] = serde_json::json!({"type": format!("test_{status}")});
        }
        items.push(serde_json::json!({ "create": item }));
    }
    inner.seen.bulk_requests.push(messages);
    inner.seen.statuses.push(200);
    (
        StatusCode::OK,
        serde_json::json!({"took": 1, "errors": errors, "items": items}).to_string(),
    )
}

async fn loki(State(s): State<Arc<Mutex<Inner>>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mut inner = s.lock().unwrap();
    let body = note(&mut inner, &headers, body);
    if let Some(code) = whole_request_fault(&mut inner) {
        return StatusCode::from_u16(code).unwrap();
    }
    let v: Value = serde_json::from_slice(&body).expect("Loki push must be JSON");
    for stream in v["streams"].as_array().expect("streams") {
        let labels: HashMap<String, String> = stream["stream"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        for entry in stream["values"].as_array().unwrap() {
            let ts = entry[0].as_str().unwrap();
            assert!(ts.parse::<i128>().is_ok(), "timestamp in ns as a string");
            let rec: Value = serde_json::from_str(entry[1].as_str().unwrap()).unwrap();
            inner.seen.records.push(rec);
            inner.seen.loki_labels.push(labels.clone());
        }
    }
    inner.seen.statuses.push(204);
    StatusCode::NO_CONTENT
}
