//! Real VictoriaLogs (`victoria-logs`, v1.52.1) for integration tests: the log store the agent's
//! sinks ship to. One process per [`VictoriaLogs`] on `127.0.0.1:<free port>`, data in a temp dir,
//! killed on drop.
//!
//! Usage from `tests/<name>.rs` (the helpers are async: use `#[tokio::test]`):
//!
//! ```ignore
//! #[path = "support/victorialogs.rs"]
//! mod victorialogs;
//!
//! let store = victorialogs::VictoriaLogs::start();
//! // point a sink at store.base_url(), e.g. "{base}/insert/jsonline?_stream_fields=host"
//! let rows = store.wait_for_count("_stream:{host=\"h1\"}", 100, Duration::from_secs(10)).await;
//! assert_eq!(rows.len(), 100);
//! ```
//!
//! With TLS ([`VictoriaLogs::start_tls`]) it listens twice: plain HTTP on `port` (health,
//! queries and every helper here) and HTTPS on `tls_port` ([`VictoriaLogs::tls_base_url`]) with
//! the given server certificate, for the client under test.
//!
//! The binary comes from `$OUTRIDER_VICTORIALOGS`, else `<repo>/e2e/bin/victoria-logs`, which
//! `e2e/tools.sh victorialogs` (or `make tools`) builds from its Go module. A missing binary is a
//! test failure, never a skip.
//!
//! # What the store accepts (v1.52.1, read from its source and pinned by `tests/victorialogs.rs`)
//!
//! Ingestion endpoints (all POST; `Content-Encoding` `gzip`, `deflate`, `zstd` and `snappy` are
//! decoded):
//! - `/insert/jsonline`: one JSON object per line. `200`, empty body. A line that is not JSON is
//!   skipped with a server-side warning and the request still answers `200`; only a request whose
//!   every line is bad gets `400`.
//! - `/insert/elasticsearch/_bulk`: action line (`{"create":{}}` or `{"index":{...}}`; the index
//!   name is ignored) followed by the document line. `200` with
//!   `{"took":..,"errors":false,"items":[{"create":{"status":201}},...]}` (one item per document).
//!   It stops at the first bad document with `400`, **keeping the documents before it**: a
//!   retry of the whole batch duplicates them.
//! - `/insert/loki/api/v1/push`: Loki JSON push `{"streams":[{"stream":{labels},"values":
//!   [["<unix ns as string>","line"(,{structured metadata})],...]}]}` when `Content-Type` is
//!   `application/json` (exactly, or with `;params`); any other content type is read as
//!   snappy-compressed protobuf (a JSON body then gets `400`). Success is `204`. Labels become
//!   fields and, unless `_stream_fields` is given, the stream fields; structured metadata becomes
//!   plain fields. A line that is a JSON object is parsed into fields (its message then comes
//!   from `_msg_field`, else `_msg` is the `-defaultMsgValue` placeholder "missing _msg field;
//!   see ..."): turn that off with `disable_message_parsing=1` (header
//!   `VL-Loki-Disable-Message-Parsing`). `X-Scope-OrgID` selects the tenant. `/insert/loki/ready`
//!   answers `200 ready`.
//!
//! Parameters of every ingestion endpoint, as query args or as headers (comma-separated lists):
//! - `_msg_field` / `VL-Msg-Field`: field(s) holding the message, renamed to `_msg`; the first
//!   present one wins. Default `_msg`.
//! - `_time_field` / `VL-Time-Field`: field(s) holding the timestamp. Default `_time`. Values:
//!   RFC3339 / ISO8601 (with fractional seconds, any zone), Unix seconds, ms, µs or ns (chosen by
//!   magnitude); `0`, `""` or a missing field mean "now at the store". Loki ignores it (the
//!   timestamp is the first element of each value).
//! - `_stream_fields` / `VL-Stream-Fields`: fields that make up the stream (`_stream`, e.g.
//!   `{host="h1",file="a.log"}`). Default: none (`{}`), except Loki (its labels).
//! - `ignore_fields`, `decolorize_fields`, `preserve_json_keys`, `extra_fields=name=value,...`
//!   (headers `VL-Ignore-Fields`, `VL-Decolorize-Fields`, `VL-Preserve-JSON-Keys`,
//!   `VL-Extra-Fields`); `debug=1` logs the parsed rows and **drops** them.
//! - Tenant: headers `AccountID` and `ProjectID` (default 0:0).
//!
//! Traps:
//! - The params are read with Go's `Request.FormValue`, which reads an
//!   `application/x-www-form-urlencoded` POST body as form data: such a request (curl's
//!   default for `--data-binary`) answers `200` and stores **nothing**. Send
//!   `application/x-ndjson` / `application/stream+json` / `application/json`.
//! - Nested JSON objects are flattened with `.` (`{"host":{"name":"a"}}` → `host.name`);
//!   numbers, booleans and arrays are stored as strings. Empty values are the same as missing.
//! - Rows older than `now - retentionPeriod` (default 7d) or newer than `now + futureRetention`
//!   (default 2d) are dropped with `2xx`; only the metric
//!   `vl_rows_dropped_total{reason="too_small_timestamp"|"too_big_timestamp"}` and a throttled
//!   warning tell.
//!
//! Visibility: ingested rows sit in in-memory buffers and become searchable within about a
//! second. `GET /internal/force_flush` makes everything ingested so far searchable at once;
//! [`VictoriaLogs::wait_for_count`] calls it before every poll.
//!
//! Querying: `/select/logsql/query` with `query=<LogsQL>` as a GET query arg or a form-encoded
//! POST body; optional `limit` (then the newest `limit` rows), `offset`, `start`, `end`. The
//! answer is NDJSON, one object per row with every field as a string (`_msg`, `_time` in RFC3339
//! with nanoseconds and trailing zeros trimmed, `_stream`, `_stream_id`, ...), in no particular
//! order (add `| sort by (_time)`). No row = empty body. A bad query gets `400`. Also `/health`
//! (`200 OK`) and `/metrics` (Prometheus text).
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const INSTALL_HINT: &str = "run `e2e/tools.sh victorialogs` (or `make tools`) to build it, \
                            or set OUTRIDER_VICTORIALOGS to a victoria-logs binary";
const START_TIMEOUT: Duration = Duration::from_secs(15);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Content type for `/insert/jsonline` and `/insert/elasticsearch/_bulk` bodies.
pub const NDJSON: &str = "application/x-ndjson";
/// Content type that makes `/insert/loki/api/v1/push` read JSON (anything else means protobuf).
pub const JSON: &str = "application/json";

/// One running victoria-logs. Dropping it kills the process (SIGKILL) and removes its data.
pub struct VictoriaLogs {
    /// The port it listens on, on 127.0.0.1 only.
    pub port: u16,
    /// The HTTPS port when started with [`VictoriaLogs::start_tls`].
    pub tls_port: Option<u16>,
    /// Holds `data/` (-storageDataPath) and `victoria-logs.log` (its stdout and stderr).
    pub dir: tempfile::TempDir,
    child: Child,
    client: reqwest::Client,
}

/// Status code and body of an HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl VictoriaLogs {
    /// Starts victoria-logs on 127.0.0.1:<free port> with a fresh temp storage dir and waits (at
    /// most 15 s) until `/health` answers `OK`. Blocking: fine to call from a `#[tokio::test]`.
    pub fn start() -> VictoriaLogs {
        VictoriaLogs::start_with(&[])
    }

    /// Like [`VictoriaLogs::start`], with extra command-line flags (e.g. `-retentionPeriod=30d`).
    pub fn start_with(extra_flags: &[&str]) -> VictoriaLogs {
        VictoriaLogs::launch(extra_flags, None)
    }

    /// Like [`VictoriaLogs::start`], plus an HTTPS listener on 127.0.0.1:<free port> serving the
    /// PEM certificate (chain) `cert` with its key `key` (`-tls -tlsCertFile -tlsKeyFile`).
    pub fn start_tls(cert: &Path, key: &Path) -> VictoriaLogs {
        VictoriaLogs::launch(&[], Some((cert, key)))
    }

    fn launch(extra_flags: &[&str], tls: Option<(&Path, &Path)>) -> VictoriaLogs {
        let binary = binary();
        let dir = tempfile::Builder::new()
            .prefix("outrider-victorialogs-")
            .tempdir()
            .expect("create the victoria-logs temp dir");
        let log_path = dir.path().join("victoria-logs.log");
        let mut last_failure = String::new();
        // A free port can be taken between probing it and victoria-logs binding it: try a few.
        for _attempt in 0..5 {
            let port = free_port();
            // The flags are per listen address: plain first, then HTTPS.
            let (tls_port, listen) = match tls {
                None => (None, vec![format!("-httpListenAddr=127.0.0.1:{port}")]),
                Some((cert, key)) => {
                    let tls_port = free_port();
                    let (cert, key) = (cert.display(), key.display());
                    let flags = vec![
                        format!("-httpListenAddr=127.0.0.1:{port},127.0.0.1:{tls_port}"),
                        "-tls=false,true".to_string(),
                        format!("-tlsCertFile={cert},{cert}"),
                        format!("-tlsKeyFile={key},{key}"),
                    ];
                    (Some(tls_port), flags)
                }
            };
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .expect("open victoria-logs.log");
            let log_start = log.metadata().map(|m| m.len()).unwrap_or(0) as usize;
            let mut child = Command::new(&binary)
                .args(&listen)
                .arg(format!(
                    "-storageDataPath={}",
                    dir.path().join("data").display()
                ))
                .args(extra_flags)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup victoria-logs.log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}: {INSTALL_HINT}", binary.display()));
            match wait_healthy(&mut child, port, &log_path, log_start) {
                Ok(()) if tls_port.is_some_and(|p| !tls_listening(p)) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_failure = format!(
                        "the HTTPS listener did not come up; log:\n{}",
                        log_tail(&log_path, log_start)
                    );
                    if !last_failure.contains("address already in use") {
                        break;
                    }
                }
                Ok(()) => {
                    let client = reqwest::Client::builder()
                        .timeout(REQUEST_TIMEOUT)
                        .no_proxy()
                        .build()
                        .expect("build the HTTP client");
                    return VictoriaLogs {
                        port,
                        tls_port,
                        dir,
                        child,
                        client,
                    };
                }
                Err(failure) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let address_in_use = failure.contains("address already in use");
                    last_failure = failure;
                    if !address_in_use {
                        break;
                    }
                }
            }
        }
        panic!("victoria-logs did not start: {last_failure}");
    }

    /// `http://127.0.0.1:<port>` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `https://127.0.0.1:<tls_port>` (no trailing slash). Panics when started without TLS.
    pub fn tls_base_url(&self) -> String {
        let port = self
            .tls_port
            .expect("victoria-logs was started without TLS");
        format!("https://127.0.0.1:{port}")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What victoria-logs wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("victoria-logs.log"))
    }

    /// POSTs `body` to `path_and_query` (e.g. `/insert/jsonline?_stream_fields=host`) with the
    /// given content type. Returns whatever the store answered; never panics on a non-2xx.
    pub async fn post(&self, path_and_query: &str, content_type: &str, body: String) -> Response {
        let url = format!("{}{path_and_query}", self.base_url());
        let answer = self
            .client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        let status = answer.status().as_u16();
        let body = answer
            .text()
            .await
            .unwrap_or_else(|e| panic!("read the answer to POST {url}: {e}"));
        Response { status, body }
    }

    /// GETs `path_and_query`.
    pub async fn get(&self, path_and_query: &str) -> Response {
        let url = format!("{}{path_and_query}", self.base_url());
        let answer = self
            .client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = answer.status().as_u16();
        let body = answer
            .text()
            .await
            .unwrap_or_else(|e| panic!("read the answer to GET {url}: {e}"));
        Response { status, body }
    }

    /// `/insert/jsonline?<params>` with one JSON object per line.
    pub async fn insert_jsonline(&self, params: &str, rows: &[serde_json::Value]) -> Response {
        let mut body = String::new();
        for row in rows {
            body.push_str(&row.to_string());
            body.push('\n');
        }
        self.post(&with_params("/insert/jsonline", params), NDJSON, body)
            .await
    }

    /// `/insert/elasticsearch/_bulk?<params>`, each document after a `{"create":{}}` line.
    pub async fn insert_elasticsearch_bulk(
        &self,
        params: &str,
        docs: &[serde_json::Value],
    ) -> Response {
        let mut body = String::new();
        for doc in docs {
            body.push_str("{\"create\":{}}\n");
            body.push_str(&doc.to_string());
            body.push('\n');
        }
        self.post(
            &with_params("/insert/elasticsearch/_bulk", params),
            NDJSON,
            body,
        )
        .await
    }

    /// `/insert/loki/api/v1/push?<params>` with a Loki JSON push body (`{"streams":[...]}`).
    pub async fn insert_loki_json(&self, params: &str, push: &serde_json::Value) -> Response {
        self.post(
            &with_params("/insert/loki/api/v1/push", params),
            JSON,
            push.to_string(),
        )
        .await
    }

    /// `/internal/force_flush`: everything ingested so far becomes searchable.
    pub async fn flush(&self) {
        let answer = self.get("/internal/force_flush").await;
        assert_eq!(
            answer.status, 200,
            "/internal/force_flush answered {answer:?}"
        );
    }

    /// Runs a LogsQL query (`/select/logsql/query`, form-encoded POST) and returns its rows, in
    /// the store's order. Does not flush: see [`VictoriaLogs::wait_for_count`]. Panics when the
    /// store rejects the query.
    pub async fn query(&self, logsql: &str) -> Vec<serde_json::Value> {
        let url = format!("{}/select/logsql/query", self.base_url());
        let answer = self
            .client
            .post(&url)
            .form(&[("query", logsql)])
            .send()
            .await
            .unwrap_or_else(|e| panic!("query {logsql:?}: {e}"));
        let status = answer.status();
        let body = answer
            .text()
            .await
            .unwrap_or_else(|e| panic!("read the answer to query {logsql:?}: {e}"));
        assert!(
            status.is_success(),
            "query {logsql:?} failed with {status}: {body}"
        );
        body.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("query {logsql:?}: bad NDJSON line {line:?}: {e}"))
            })
            .collect()
    }

    /// How many rows `logsql` matches (`<logsql> | stats count() as n`). Does not flush.
    pub async fn count(&self, logsql: &str) -> u64 {
        let rows = self.query(&format!("{logsql} | stats count() as n")).await;
        let n = rows
            .first()
            .and_then(|row| row.get("n"))
            .and_then(|n| n.as_str())
            .unwrap_or_else(|| panic!("count {logsql:?}: unexpected answer {rows:?}"));
        n.parse()
            .unwrap_or_else(|e| panic!("count {logsql:?}: {n:?}: {e}"))
    }

    /// Flushes and counts the rows `logsql` matches until there are at least `n`, for at most
    /// `timeout`, then returns the matching rows (callers assert the exact number: a duplicate
    /// shows as more than `n`). Panics with the last count and the store's log on timeout.
    pub async fn wait_for_count(
        &self,
        logsql: &str,
        n: u64,
        timeout: Duration,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            self.flush().await;
            let seen = self.count(logsql).await;
            if seen >= n {
                return self.query(logsql).await;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{logsql:?} matched {seen} rows, not {n}, after {timeout:?}; \
                     victoria-logs log tail:\n{}",
                    log_tail(&self.dir.path().join("victoria-logs.log"), 0)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `/metrics` (Prometheus text format).
    pub async fn metrics(&self) -> String {
        let answer = self.get("/metrics").await;
        assert_eq!(answer.status, 200, "/metrics answered {}", answer.status);
        answer.body
    }

    /// The value of one sample from `/metrics`, by its exact series text (name plus labels as
    /// printed, e.g. `vl_rows_dropped_total{reason="too_small_timestamp"}`); 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|line| {
                let rest = line.strip_prefix(series)?;
                rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
            })
            .unwrap_or(0.0)
    }
}

impl Drop for VictoriaLogs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `unix_nanos` formatted the way VictoriaLogs prints `_time`: RFC3339 in UTC with nanoseconds,
/// trailing zeros of the fraction trimmed (Go's `time.RFC3339Nano`).
pub fn rfc3339_nanos(unix_nanos: i64) -> String {
    let secs = unix_nanos.div_euclid(1_000_000_000);
    let nanos = unix_nanos.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let second_of_day = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    );
    if nanos != 0 {
        let fraction = format!("{nanos:09}");
        out.push('.');
        out.push_str(fraction.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i64
}

fn with_params(path: &str, params: &str) -> String {
    if params.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", params.trim_start_matches('?'))
    }
}

fn binary() -> PathBuf {
    let path = match std::env::var_os("OUTRIDER_VICTORIALOGS") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/bin/victoria-logs"),
    };
    assert!(
        path.is_file(),
        "victoria-logs not found at {}: {INSTALL_HINT}",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}

/// Ready = `GET /health` answers 200 with body `OK`.
fn wait_healthy(
    child: &mut Child,
    port: u16,
    log_path: &Path,
    log_start: usize,
) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "victoria-logs exited with {status}; log:\n{}",
                log_tail(log_path, log_start)
            ));
        }
        if health_ok(port) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "victoria-logs /health not OK on port {port} after {START_TIMEOUT:?}; log:\n{}",
                log_tail(log_path, log_start)
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The HTTPS listener accepts connections (both listeners start together, so once `/health`
/// answers on the plain one this holds at once or within a moment).
fn tls_listening(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// A blocking `GET /health` over a plain socket (no async runtime needed to start the store).
fn health_ok(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200") && answer.ends_with("\r\n\r\nOK")
}

fn read_log(path: &Path) -> String {
    String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned()
}

/// The last 30 lines of the log from byte `from` on.
fn log_tail(path: &Path, from: usize) -> String {
    let log = read_log(path);
    let log = log.get(from..).unwrap_or(&log);
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
