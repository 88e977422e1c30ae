//! A small fault-injecting log receiver for the agent's integration tests (tests only).
//!
//! It speaks the three HTTP protocols the agent ships with — NDJSON POST (`/ingest`),
//! Elasticsearch `_bulk` and the Loki push API — stores what it accepted, and can be told
//! to fail: whole requests (any status, e.g. 503 to play "down"), or per `_bulk` item by
//! the record's message (`busy` → 429 the first time, `reject` → 400, `exists` → 409).
//! Two transport faults too: a slow answer (the request is processed and stored, then
//! answered only after a delay, e.g. longer than the client's timeout) and a connection
//! reset (the request is read in full, nothing is stored, and the TCP connection is
//! closed with an RST instead of an answer).
//! It runs on its own runtime thread, so tests stay plain synchronous code.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::{IncomingStream, Listener};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

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
    /// Requests answered late (see [`Receiver::slow_next`]).
    pub slow: usize,
    /// Messages of the records stored by those late requests.
    pub slow_messages: Vec<String>,
    /// Requests answered with a connection reset (see [`Receiver::reset_next`]).
    pub resets: usize,
    /// Requests answered `302 Found` to `/landing` (see [`Receiver::redirect_next`]).
    pub redirects: usize,
    /// Requests that reached `/landing`, the 200 page redirects point at.
    pub landings: usize,
    /// Requests answered 200 with a body that never ends (see [`Receiver::endless_next`]).
    pub endless: usize,
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
    /// Answer the next N requests only after `slow_delay` (they are processed at once).
    slow_next: usize,
    slow_delay: Duration,
    /// Reset the connection of the next N requests instead of answering them.
    reset_next: usize,
    /// Answer the next N requests `302 Found`, Location `/landing`, storing nothing.
    redirect_next: usize,
    /// Store the next N requests and answer 200 with a body that never ends.
    endless_next: usize,
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
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let app = Router::new()
                    .route("/ingest", post(ingest))
                    .route("/_bulk", post(bulk))
                    .route("/loki/api/v1/push", post(loki))
                    .route("/landing", axum::routing::any(landing))
                    .with_state(state);
                let service = app.into_make_service_with_connect_info::<Conn>();
                axum::serve(ResettableListener(listener), service)
                    .await
                    .unwrap();
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

    /// Answers the next `n` requests `302 Found` to a page that answers 200 (`/landing`),
    /// storing nothing: a client that follows it would count the records delivered.
    pub fn redirect_next(&self, n: usize) {
        self.inner.lock().unwrap().redirect_next = n;
    }

    /// Stores the next `n` requests and answers each 200 with a body that never ends: a
    /// client that reads the whole answer never finishes.
    pub fn endless_next(&self, n: usize) {
        self.inner.lock().unwrap().endless_next = n;
    }

    /// Processes (and stores) the next `n` requests at once but answers each only after
    /// `delay`: a sink that committed the records but whose answer comes too late.
    pub fn slow_next(&self, n: usize, delay: Duration) {
        let mut inner = self.inner.lock().unwrap();
        inner.slow_next = n;
        inner.slow_delay = delay;
    }

    /// Reads the next `n` requests in full, stores nothing and resets their connections
    /// (TCP RST, no answer): a sink that died mid-request.
    pub fn reset_next(&self, n: usize) {
        self.inner.lock().unwrap().reset_next = n;
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

type Shared = Arc<Mutex<Inner>>;

/// Applies the transport faults around a handler: a reset (nothing stored, connection
/// reset) or a slow answer (stored now, answered after the delay).
async fn with_faults<R: IntoResponse>(
    s: &Shared,
    conn: &Conn,
    handle: impl FnOnce(&mut Inner) -> R,
) -> Response {
    let (response, delay) = {
        let mut inner = s.lock().unwrap();
        if inner.reset_next > 0 {
            inner.reset_next -= 1;
            inner.seen.requests += 1;
            inner.seen.resets += 1;
            // The connection fails on the first byte of the answer: the client gets an RST.
            conn.reset();
            return StatusCode::OK.into_response();
        }
        if inner.redirect_next > 0 {
            inner.redirect_next -= 1;
            inner.seen.requests += 1;
            inner.seen.redirects += 1;
            inner.seen.statuses.push(302);
            return (StatusCode::FOUND, [("Location", "/landing")]).into_response();
        }
        if inner.endless_next > 0 {
            inner.endless_next -= 1;
            inner.seen.endless += 1;
            let _ = handle(&mut inner).into_response();
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures::stream::repeat_with(move || Ok::<_, io::Error>(chunk.clone()));
            return (StatusCode::OK, axum::body::Body::from_stream(stream)).into_response();
        }
        let delay = (inner.slow_next > 0).then(|| {
            inner.slow_next -= 1;
            inner.seen.slow += 1;
            inner.slow_delay
        });
        let before = inner.seen.records.len();
        let response = handle(&mut inner).into_response();
        if delay.is_some() {
            let stored: Vec<String> = inner.seen.records[before..]
                .iter()
                .map(|r| r["message"].as_str().unwrap_or_default().to_string())
                .collect();
            inner.seen.slow_messages.extend(stored);
        }
        (response, delay)
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    response
}

/// The page redirects point at: 200 to anything.
async fn landing(State(s): State<Shared>) -> StatusCode {
    s.lock().unwrap().seen.landings += 1;
    StatusCode::OK
}

async fn ingest(
    State(s): State<Shared>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    with_faults(&s, &conn, |inner| ingest_now(inner, &headers, body)).await
}

fn ingest_now(inner: &mut Inner, headers: &HeaderMap, body: Bytes) -> StatusCode {
    let body = note(inner, headers, body);
    if let Some(code) = whole_request_fault(inner) {
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
    State(s): State<Shared>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    with_faults(&s, &conn, |inner| bulk_now(inner, &headers, body)).await
}

fn bulk_now(inner: &mut Inner, headers: &HeaderMap, body: Bytes) -> (StatusCode, String) {
    let body = note(inner, headers, body);
    if let Some(code) = whole_request_fault(inner) {
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

async fn loki(
    State(s): State<Shared>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    with_faults(&s, &conn, |inner| loki_now(inner, &headers, body)).await
}

fn loki_now(inner: &mut Inner, headers: &HeaderMap, body: Bytes) -> StatusCode {
    let body = note(inner, headers, body);
    if let Some(code) = whole_request_fault(inner) {
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

/// One accepted connection's handle: a handler resets its own connection through it.
#[derive(Clone)]
struct Conn(Arc<AtomicBool>);

impl Conn {
    fn reset(&self) {
        self.0.store(true, Ordering::Release);
    }
}

impl Connected<IncomingStream<'_, ResettableListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, ResettableListener>) -> Self {
        Conn(stream.io().reset.clone())
    }
}

/// A TCP listener whose connections can be reset by the request handler.
struct ResettableListener(TcpListener);

impl Listener for ResettableListener {
    type Io = ResettableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((inner, addr)) => {
                    let reset = Arc::new(AtomicBool::new(false));
                    return (ResettableStream { inner, reset }, addr);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// A connection that, once its handler asked for a reset, fails every write: hyper then
/// drops it without having sent a byte of the answer, and the zero linger set here turns
/// that close into a TCP RST.
struct ResettableStream {
    inner: TcpStream,
    reset: Arc<AtomicBool>,
}

impl ResettableStream {
    fn reset_now(&self) -> Option<io::Error> {
        if !self.reset.load(Ordering::Acquire) {
            return None;
        }
        let _ = self.inner.set_zero_linger();
        Some(io::ErrorKind::ConnectionReset.into())
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.reset_now() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.reset_now() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.reset_now() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.reset_now() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
