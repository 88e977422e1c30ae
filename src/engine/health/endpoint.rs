//! HealthCheck endpoint probes, run from the controller process: an HTTP(S) GET, a TCP
//! connect, or a TLS handshake with a certificate expiry check.
//!
//! Everything that can be wrong with a spec (a bad regex, a CA that is not PEM, an
//! unparsable duration) is found once in [`EndpointProbe::new`], per spec generation,
//! and named by its field; [`EndpointProbe::probe`] then only reports what the network
//! said. An unreachable endpoint is a failed probe (Fail with the reason), not an unknown
//! one: from the controller, "cannot reach it" is the finding.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use regex::bytes::{Regex, RegexBuilder};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::Observation;
use crate::api::common::DurationString;
use crate::api::health_check::{Endpoint, HttpProbe, TcpProbe, TlsProbe};

/// Most body bytes read: a health page is small, and a huge one must not cost memory.
const BODY_LIMIT: usize = 64 * 1024;

/// Compiled size limit of `bodyRegex`: a spec must not make the controller build a
/// regex program of unbounded size.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Longest timeout honoured: larger values are clamped so `Instant + Duration` cannot
/// overflow, and no probe holds a round for longer.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

const SECONDS_PER_DAY: f64 = 86_400.0;

/// How probe host names are resolved: the system resolver, or a fixed map (tests, and
/// names the caller pins).
#[derive(Clone, Debug, Default)]
pub enum Resolver {
    #[default]
    System,
    Static(Arc<HashMap<String, Vec<IpAddr>>>),
}

/// A spec problem found when the probe is built, named by its field so it can become a
/// `Ready=False` condition the user can act on.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct EndpointError {
    /// Field path such as `spec.endpoints[api].http.bodyRegex`.
    pub field: String,
    pub message: String,
}

/// One endpoint's probe, built once per spec generation and reused every round (the HTTP
/// client and TLS configuration are built here, not per probe).
pub struct EndpointProbe {
    name: String,
    timeout: Duration,
    /// The timeout as the spec wrote it, for messages ("timed out after 10s").
    timeout_text: String,
    check: Check,
}

enum Check {
    Http(Box<HttpCheck>),
    Tcp(TcpCheck),
    Tls(Box<TlsCheck>),
}

struct HttpCheck {
    client: reqwest::Client,
    url: reqwest::Url,
    /// The URL without user info, for messages.
    shown_url: String,
    expect: HttpExpect,
}

/// What a response must look like; separate from the client so it can be judged (and
/// tested) without a network.
struct HttpExpect {
    status: Vec<u16>,
    max_latency: Option<Duration>,
    body_contains: Option<String>,
    body_regex: Option<Regex>,
}

struct TcpCheck {
    target: HostPort,
    resolver: Resolver,
}

struct TlsCheck {
    target: HostPort,
    resolver: Resolver,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    min_valid_for: Duration,
}

/// A parsed `host:port` / `[ipv6]:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct HostPort {
    /// Without brackets.
    host: String,
    port: u16,
    /// As written in the spec, for messages.
    text: String,
}

impl fmt::Debug for EndpointProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointProbe")
            .field("name", &self.name)
            .field("kind", &self.kind())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl EndpointProbe {
    /// ca_pem: the PEM bytes of the referenced Secret's `ca.crt` when caSecretRef is set
    /// (the caller reads the Secret).
    pub fn new(
        spec: &Endpoint,
        ca_pem: Option<&[u8]>,
        resolver: Resolver,
    ) -> Result<Self, EndpointError> {
        let path = Path::new(&spec.name);
        let timeout = duration(&spec.timeout, &path.field("timeout"))?;
        if timeout.is_zero() {
            return Err(path.err("timeout", "must be more than 0s"));
        }
        let timeout = timeout.min(MAX_TIMEOUT);
        let check = match (&spec.http, &spec.tcp, &spec.tls) {
            (Some(http), None, None) => Check::Http(Box::new(HttpCheck::new(
                http, ca_pem, resolver, timeout, &path,
            )?)),
            (None, Some(tcp), None) => Check::Tcp(TcpCheck::new(tcp, resolver, &path)?),
            (None, None, Some(tls)) => {
                Check::Tls(Box::new(TlsCheck::new(tls, ca_pem, resolver, &path)?))
            }
            _ => {
                return Err(EndpointError {
                    field: path.base(),
                    message: "exactly one of http, tcp or tls must be set".into(),
                });
            }
        };
        Ok(Self {
            name: spec.name.clone(),
            timeout,
            timeout_text: spec.timeout.0.clone(),
            check,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// "http" | "tcp" | "tls": the metrics label `probe`.
    pub fn kind(&self) -> &'static str {
        match self.check {
            Check::Http(_) => "http",
            Check::Tcp(_) => "tcp",
            Check::Tls(_) => "tls",
        }
    }

    /// Runs the probe once. Never panics and never takes (much) longer than the timeout:
    /// the whole probe, resolution and body included, runs under one deadline.
    pub async fn probe(&self) -> Observation {
        let start = Instant::now();
        let run = async {
            match &self.check {
                Check::Http(h) => h.probe(&self.timeout_text).await,
                Check::Tcp(t) => t.probe().await,
                Check::Tls(t) => t.probe().await,
            }
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok(observation) => observation.latency(start.elapsed()),
            Err(_) => Observation::fail(format!(
                "{}: timed out after {}",
                self.target_text(),
                self.timeout_text
            ))
            .latency(start.elapsed()),
        }
    }

    /// What the probe talks to, for messages.
    fn target_text(&self) -> &str {
        match &self.check {
            Check::Http(h) => &h.shown_url,
            Check::Tcp(t) => &t.target.text,
            Check::Tls(t) => &t.target.text,
        }
    }
}

/// Field paths under `spec.endpoints[NAME]`.
struct Path<'a> {
    name: &'a str,
}

impl<'a> Path<'a> {
    fn new(name: &'a str) -> Self {
        Self { name }
    }

    fn base(&self) -> String {
        format!("spec.endpoints[{}]", self.name)
    }

    fn field(&self, rest: &str) -> String {
        format!("{}.{rest}", self.base())
    }

    fn err(&self, rest: &str, message: impl Into<String>) -> EndpointError {
        EndpointError {
            field: self.field(rest),
            message: message.into(),
        }
    }
}

/// Parses a spec duration, naming the field when it does not parse.
fn duration(value: &DurationString, field: &str) -> Result<Duration, EndpointError> {
    let bad = |message: String| EndpointError {
        field: field.to_string(),
        message,
    };
    if value.0.trim_start().starts_with('-') {
        return Err(bad(format!("{:?} is negative", value.0)));
    }
    value
        .to_std()
        .map_err(|e| bad(format!("{:?} is not a duration: {e}", value.0)))
}

/// The certificates of a `ca.crt`, each checked to be usable as a trust anchor.
fn ca_certificates(pem: &[u8], field: &str) -> Result<Vec<CertificateDer<'static>>, EndpointError> {
    let bad = |message: String| EndpointError {
        field: field.to_string(),
        message,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("ca.crt is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("ca.crt holds no PEM certificate".into()));
    }
    let mut store = rustls::RootCertStore::empty();
    for cert in &certs {
        store.add(cert.clone()).map_err(|e| {
            bad(format!(
                "ca.crt holds a certificate that cannot be a CA: {e}"
            ))
        })?;
    }
    Ok(certs)
}

/// The CA PEM to trust, or an error when the spec names a Secret but the caller had no
/// `ca.crt` to give (silently trusting only the public roots would hide the mistake).
fn ca_for<'p>(
    ca_secret: Option<&crate::api::common::LocalObjectReference>,
    ca_pem: Option<&'p [u8]>,
    field: &str,
) -> Result<Option<&'p [u8]>, EndpointError> {
    match (ca_secret, ca_pem) {
        (Some(secret), None) => Err(EndpointError {
            field: field.to_string(),
            message: format!("Secret {:?} has no ca.crt", secret.name),
        }),
        (_, pem) => Ok(pem),
    }
}

impl HttpCheck {
    fn new(
        spec: &HttpProbe,
        ca_pem: Option<&[u8]>,
        resolver: Resolver,
        timeout: Duration,
        path: &Path<'_>,
    ) -> Result<Self, EndpointError> {
        let url = reqwest::Url::parse(&spec.url)
            .map_err(|e| path.err("http.url", format!("{:?} is not a URL: {e}", spec.url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(path.err(
                "http.url",
                format!("{:?} is not an http:// or https:// URL", spec.url),
            ));
        }
        let mut shown = url.clone();
        // Only fails for URLs without a host, excluded above.
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        let shown_url = shown.to_string();

        if spec.expect_status.is_empty() {
            return Err(path.err("http.expectStatus", "must list at least one status"));
        }
        let max_latency = spec
            .max_latency
            .as_ref()
            .map(|d| duration(d, &path.field("http.maxLatency")))
            .transpose()?;
        let body_regex = spec
            .body_regex
            .as_deref()
            .map(|re| compile_regex(re, &path.field("http.bodyRegex")))
            .transpose()?;

        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_max_idle_per_host(0)
            .timeout(timeout)
            .user_agent(concat!("outrider-healthcheck/", env!("CARGO_PKG_VERSION")))
            .danger_accept_invalid_certs(spec.insecure_skip_verify);
        let ca_field = path.field("http.caSecretRef");
        if let Some(pem) = ca_for(spec.ca_secret_ref.as_ref(), ca_pem, &ca_field)? {
            for cert in ca_certificates(pem, &ca_field)? {
                let cert = reqwest::Certificate::from_der(&cert)
                    .map_err(|e| path.err("http.caSecretRef", format!("ca.crt: {e}")))?;
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Resolver::Static(map) = resolver {
            builder = builder.dns_resolver(Arc::new(StaticResolve(map)));
        }
        let client = builder.build().map_err(|e| {
            path.err(
                "http",
                format!("cannot build the HTTP client: {}", error_chain(&e)),
            )
        })?;
        Ok(Self {
            client,
            url,
            shown_url,
            expect: HttpExpect {
                status: spec.expect_status.clone(),
                max_latency,
                body_contains: spec.body_contains.clone(),
                body_regex,
            },
        })
    }

    async fn probe(&self, timeout_text: &str) -> Observation {
        let start = Instant::now();
        let response = match self.client.get(self.url.clone()).send().await {
            Ok(response) => response,
            Err(e) => {
                return Observation::fail(format!(
                    "{}: {}",
                    self.shown_url,
                    describe_request_error(&e, timeout_text)
                ));
            }
        };
        let status = response.status().as_u16();
        let (body, truncated) = match read_body(response).await {
            Ok(read) => read,
            Err(e) => {
                return Observation::fail(format!(
                    "{}: HTTP {status}, then reading the body: {}",
                    self.shown_url,
                    describe_request_error(&e, timeout_text)
                ));
            }
        };
        self.expect.judge(status, &body, truncated, start.elapsed())
    }
}

/// The first [`BODY_LIMIT`] bytes of the body, and whether reading stopped there.
async fn read_body(mut response: reqwest::Response) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = BODY_LIMIT - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= BODY_LIMIT {
            return Ok((body, true));
        }
    }
    Ok((body, false))
}

fn compile_regex(pattern: &str, field: &str) -> Result<Regex, EndpointError> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| EndpointError {
            field: field.to_string(),
            message: match e {
                regex::Error::CompiledTooBig(_) => {
                    "the regular expression is too big (over the 1 MiB compiled size limit)"
                        .to_string()
                }
                // The syntax error's text is multi-line (pattern, caret, reason): keep the
                // reason, which reads on one line in a condition.
                other => {
                    let text = other.to_string();
                    let reason = text
                        .lines()
                        .rev()
                        .find_map(|l| l.trim().strip_prefix("error: "))
                        .unwrap_or(text.trim());
                    format!("invalid regular expression {pattern:?}: {reason}")
                }
            },
        })
}

impl HttpExpect {
    /// Pass when the status is expected, the body checks pass and the latency is within
    /// `maxLatency`; value = latency in ms, threshold = `maxLatency` in ms.
    fn judge(&self, status: u16, body: &[u8], truncated: bool, elapsed: Duration) -> Observation {
        let mut problems = Vec::new();
        if !self.status.contains(&status) {
            problems.push(format!(
                "HTTP {status}, expected {}",
                status_list(&self.status)
            ));
        } else {
            let within = if truncated {
                " (in the first 64 KiB)"
            } else {
                ""
            };
            if let Some(needle) = &self.body_contains
                && memchr::memmem::find(body, needle.as_bytes()).is_none()
            {
                problems.push(format!("body does not contain {needle:?}{within}"));
            }
            if let Some(re) = &self.body_regex
                && !re.is_match(body)
            {
                problems.push(format!("body does not match {:?}{within}", re.as_str()));
            }
        }
        if let Some(max) = self.max_latency
            && elapsed > max
        {
            problems.push(format!(
                "latency {} over the {} limit",
                fmt_ms(elapsed),
                fmt_ms(max)
            ));
        }
        let observation = if problems.is_empty() {
            Observation::pass(format!("HTTP {status} in {}", fmt_ms(elapsed)))
        } else {
            Observation::fail(problems.join("; "))
        };
        observation.value(ms(elapsed), self.max_latency.map(ms))
    }
}

fn status_list(statuses: &[u16]) -> String {
    match statuses {
        [one] => one.to_string(),
        many => {
            let list: Vec<String> = many.iter().map(u16::to_string).collect();
            format!("one of {}", list.join(", "))
        }
    }
}

/// Milliseconds, rounded to the microsecond (status stays readable).
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// "12ms", "0.4ms", "1500ms": one unit so messages compare at a glance.
fn fmt_ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 && ms.fract() != 0.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{ms:.0}ms")
    }
}

/// A reason for a failed request: the real cause from deep in the error's source chain
/// (reqwest's own text only says "error sending request").
fn describe_request_error(e: &reqwest::Error, timeout_text: &str) -> String {
    if e.is_timeout() {
        return format!("timed out after {timeout_text}");
    }
    let mut messages: Vec<String> = Vec::new();
    let mut dns = false;
    let mut source = e.source();
    while let Some(err) = source {
        if let Some(found) = known_cause(err) {
            return found;
        }
        let text = err.to_string();
        if text == "dns error" {
            dns = true;
        } else if !text.starts_with("client error (") {
            messages.push(text);
        }
        source = err.source();
    }
    let reason = if messages.is_empty() {
        without_url_text(e)
    } else {
        messages.dedup();
        messages.join(": ")
    };
    if dns {
        let host = e.url().and_then(|u| u.host_str()).unwrap_or("the host");
        format!("{host} does not resolve: {reason}")
    } else {
        reason
    }
}

/// reqwest's top-level text without the URL (the message already starts with it).
fn without_url_text(e: &reqwest::Error) -> String {
    let text = e.to_string();
    match e.url() {
        Some(url) => text.replace(&format!(" ({url})"), ""),
        None => text,
    }
}

/// A cause this module can say something precise about: a name missing from the static
/// map, a TLS failure, a refused or reset connection.
fn known_cause(err: &(dyn StdError + 'static)) -> Option<String> {
    if let Some(missing) = err.downcast_ref::<NotResolved>() {
        return Some(missing.to_string());
    }
    if let Some(tls) = err.downcast_ref::<rustls::Error>() {
        return Some(describe_rustls(tls));
    }
    if let Some(io) = err.downcast_ref::<io::Error>() {
        // io::Error's source() skips its own payload, so look inside here.
        if let Some(inner) = io.get_ref()
            && let Some(found) = known_cause(inner)
        {
            return Some(found);
        }
        return match io.kind() {
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::UnexpectedEof => Some(describe_io(io)),
            _ => None,
        };
    }
    None
}

/// Every message in an error's chain, joined: for errors with no better description.
fn error_chain(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        let next = err.to_string();
        if !text.contains(&next) {
            text = format!("{text}: {next}");
        }
        source = err.source();
    }
    text
}

/// A TLS failure in words, with a hint where the fix is usually in the spec.
fn describe_rustls(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(cert) => {
            let reason = match cert {
                C::UnknownIssuer => "unknown issuer (not signed by a trusted CA; \
                                     set caSecretRef for a private CA)"
                    .to_string(),
                C::BadSignature => "bad signature".to_string(),
                C::Expired => "certificate expired".to_string(),
                C::NotValidYet => "certificate not valid yet".to_string(),
                C::NotValidForName => "certificate not valid for the server name".to_string(),
                C::Revoked => "certificate revoked".to_string(),
                C::BadEncoding => "malformed certificate".to_string(),
                other => other.to_string(),
            };
            format!("certificate verify failed: {reason}")
        }
        rustls::Error::AlertReceived(alert) => {
            format!("TLS handshake failed: the server sent alert {alert:?}")
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// An I/O failure in words, without the "(os error 111)" noise.
fn describe_io(e: &io::Error) -> String {
    if let Some(found) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return describe_rustls(found);
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset by the server".into(),
        io::ErrorKind::ConnectionAborted => "connection aborted".into(),
        io::ErrorKind::HostUnreachable => "host unreachable".into(),
        io::ErrorKind::NetworkUnreachable => "network unreachable".into(),
        io::ErrorKind::AddrNotAvailable => "address not available".into(),
        io::ErrorKind::TimedOut => "connection timed out".into(),
        io::ErrorKind::UnexpectedEof => "connection closed by the server".into(),
        _ => e.to_string(),
    }
}

/// A name missing from [`Resolver::Static`]: the probe fails as for an unknown name,
/// and nothing falls back to the system resolver.
#[derive(Debug, thiserror::Error)]
#[error("{0} does not resolve (not in the static resolver map)")]
struct NotResolved(String);

/// Looks a host name up in a static map (exact, then lower-cased: DNS is case-blind).
fn lookup_static<'m>(map: &'m HashMap<String, Vec<IpAddr>>, host: &str) -> Option<&'m [IpAddr]> {
    map.get(host)
        .or_else(|| map.get(&host.to_ascii_lowercase()))
        .map(Vec::as_slice)
        .filter(|ips| !ips.is_empty())
}

/// reqwest's view of [`Resolver::Static`].
struct StaticResolve(Arc<HashMap<String, Vec<IpAddr>>>);

impl reqwest::dns::Resolve for StaticResolve {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let result: Result<reqwest::dns::Addrs, Box<dyn StdError + Send + Sync>> =
            match lookup_static(&self.0, name.as_str()) {
                // Port 0: the connector puts in the URL's port.
                Some(ips) => Ok(Box::new(
                    ips.iter()
                        .map(|ip| SocketAddr::new(*ip, 0))
                        .collect::<Vec<_>>()
                        .into_iter(),
                )),
                None => Err(Box::new(NotResolved(name.as_str().to_string()))),
            };
        Box::pin(std::future::ready(result))
    }
}

/// Parses `host:port` or `[ipv6]:port`.
fn parse_host_port(address: &str) -> Result<HostPort, String> {
    let bad = || format!("{address:?} is not host:port or [ipv6]:port");
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host = match host.strip_prefix('[') {
        Some(rest) => {
            let inner = rest.strip_suffix(']').ok_or_else(bad)?;
            inner
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{address:?}: {inner:?} is not an IPv6 address"))?;
            inner
        }
        None if host.contains(':') => {
            return Err(format!("{address:?}: write an IPv6 address as [addr]:port"));
        }
        None => host,
    };
    if host.is_empty() {
        return Err(bad());
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{address:?}: the port must be 1-65535"))?;
    Ok(HostPort {
        host: host.to_string(),
        port,
        text: address.to_string(),
    })
}

/// The socket addresses of a target; the error says why the name does not resolve.
async fn resolve(resolver: &Resolver, target: &HostPort) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = target.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, target.port)]);
    }
    match resolver {
        Resolver::Static(map) => lookup_static(map, &target.host)
            .map(|ips| {
                ips.iter()
                    .map(|ip| SocketAddr::new(*ip, target.port))
                    .collect()
            })
            .ok_or_else(|| NotResolved(target.host.clone()).to_string()),
        Resolver::System => {
            match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
                Ok(addrs) => {
                    let addrs: Vec<SocketAddr> = addrs.collect();
                    if addrs.is_empty() {
                        Err(format!("{} does not resolve: no addresses", target.host))
                    } else {
                        Ok(addrs)
                    }
                }
                Err(e) => Err(format!("{} does not resolve: {e}", target.host)),
            }
        }
    }
}

/// Connects to the first address that accepts; the error names the target and the last
/// address's failure. The caller's deadline bounds the whole.
async fn connect(resolver: &Resolver, target: &HostPort) -> Result<TcpStream, String> {
    let addrs = resolve(resolver, target)
        .await
        .map_err(|reason| format!("{}: {reason}", target.text))?;
    let mut last = None;
    for addr in &addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last = Some((addr, e)),
        }
    }
    Err(match last {
        Some((addr, e)) if addr.ip().to_string() != target.host => {
            format!("{} ({addr}): {}", target.text, describe_io(&e))
        }
        Some((_, e)) => format!("{}: {}", target.text, describe_io(&e)),
        None => format!("{}: no addresses to connect to", target.text),
    })
}

impl TcpCheck {
    fn new(spec: &TcpProbe, resolver: Resolver, path: &Path<'_>) -> Result<Self, EndpointError> {
        let target = parse_host_port(&spec.address).map_err(|m| path.err("tcp.address", m))?;
        Ok(Self { target, resolver })
    }

    async fn probe(&self) -> Observation {
        let start = Instant::now();
        match connect(&self.resolver, &self.target).await {
            Ok(stream) => {
                let elapsed = start.elapsed();
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| self.target.text.clone());
                drop(stream);
                Observation::pass(format!("connected to {peer} in {}", fmt_ms(elapsed)))
                    .value(ms(elapsed), None)
            }
            Err(reason) => Observation::fail(reason),
        }
    }
}

impl TlsCheck {
    fn new(
        spec: &TlsProbe,
        ca_pem: Option<&[u8]>,
        resolver: Resolver,
        path: &Path<'_>,
    ) -> Result<Self, EndpointError> {
        let target = parse_host_port(&spec.address).map_err(|m| path.err("tls.address", m))?;
        let min_valid_for = duration(&spec.min_valid_for, &path.field("tls.minValidFor"))?;
        let (name, name_field) = match &spec.server_name {
            Some(name) => (name.clone(), "tls.serverName"),
            None => (target.host.clone(), "tls.address"),
        };
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| path.err(name_field, format!("{name:?} is not a server name: {e}")))?;

        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let ca_field = path.field("tls.caSecretRef");
        if let Some(pem) = ca_for(spec.ca_secret_ref.as_ref(), ca_pem, &ca_field)? {
            for cert in ca_certificates(pem, &ca_field)? {
                roots.add(cert).map_err(|e| EndpointError {
                    field: ca_field.clone(),
                    message: format!("ca.crt: {e}"),
                })?;
            }
        }
        // Explicit provider: the process-wide default may be unset (or another one).
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| path.err("tls", format!("cannot configure TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self {
            target,
            resolver,
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            min_valid_for,
        })
    }

    async fn probe(&self) -> Observation {
        let stream = match connect(&self.resolver, &self.target).await {
            Ok(stream) => stream,
            Err(reason) => return Observation::fail(reason),
        };
        let tls = match self
            .connector
            .connect(self.server_name.clone(), stream)
            .await
        {
            Ok(tls) => tls,
            Err(e) => {
                return Observation::fail(format!("{}: {}", self.target.text, describe_io(&e)));
            }
        };
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first());
        let Some(leaf) = leaf else {
            return Observation::unknown(format!(
                "{}: the handshake succeeded without a server certificate",
                self.target.text
            ));
        };
        let not_after = match x509_parser::parse_x509_certificate(leaf.as_ref()) {
            Ok((_, cert)) => cert.validity().not_after.timestamp(),
            Err(e) => {
                return Observation::fail(format!(
                    "{}: cannot read the server certificate: {e}",
                    self.target.text
                ));
            }
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        expiry(
            &self.server_name.to_str(),
            not_after,
            now,
            self.min_valid_for,
        )
    }
}

/// Judges a verified certificate's expiry: value = days left, threshold = `minValidFor`
/// in days; Fail when fewer days are left than required.
fn expiry(name: &str, not_after: i64, now: f64, min_valid_for: Duration) -> Observation {
    let days = (not_after as f64 - now) / SECONDS_PER_DAY;
    let required = min_valid_for.as_secs_f64() / SECONDS_PER_DAY;
    let when = chrono::DateTime::<chrono::Utc>::from_timestamp(not_after, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("{not_after} (UNIX)"));
    let observation = if days < 0.0 {
        Observation::fail(format!("certificate for {name} expired on {when}"))
    } else if days < required {
        Observation::fail(format!(
            "certificate for {name} expires in {days:.1} days ({when}), \
             less than the {required:.1} days required"
        ))
    } else {
        Observation::pass(format!(
            "certificate for {name} expires in {days:.1} days ({when})"
        ))
    };
    observation.value((days * 1e3).round() / 1e3, Some(required))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::health::Outcome;

    fn endpoint(yaml: &str) -> Endpoint {
        serde_yaml::from_str(yaml).expect("endpoint yaml")
    }

    fn build_err(yaml: &str, ca: Option<&[u8]>) -> EndpointError {
        match EndpointProbe::new(&endpoint(yaml), ca, Resolver::System) {
            Ok(p) => panic!("expected an error, built {p:?}"),
            Err(e) => e,
        }
    }

    fn expect(
        status: &[u16],
        max: Option<u64>,
        contains: Option<&str>,
        re: Option<&str>,
    ) -> HttpExpect {
        HttpExpect {
            status: status.to_vec(),
            max_latency: max.map(Duration::from_millis),
            body_contains: contains.map(str::to_string),
            body_regex: re.map(|r| compile_regex(r, "f").expect("regex")),
        }
    }

    #[test]
    fn http_pass_reports_status_and_latency_as_value() {
        let o = expect(&[200], Some(300), Some("ok"), Some(r#""status":\s*"up""#)).judge(
            200,
            br#"ok {"status": "up"}"#,
            false,
            Duration::from_millis(12),
        );
        assert_eq!(o.outcome, Outcome::Pass);
        assert_eq!(o.message, "HTTP 200 in 12ms");
        assert_eq!(o.value, Some(12.0));
        assert_eq!(o.threshold, Some(300.0));
    }

    #[test]
    fn http_wrong_status_names_what_was_expected() {
        let o =
            expect(&[200], None, Some("ok"), None).judge(503, b"", false, Duration::from_millis(3));
        assert_eq!(o.outcome, Outcome::Fail);
        assert_eq!(o.message, "HTTP 503, expected 200");
        assert_eq!(o.threshold, None);
        let o = expect(&[200, 204], None, None, None).judge(302, b"", false, Duration::ZERO);
        assert_eq!(o.message, "HTTP 302, expected one of 200, 204");
    }

    #[test]
    fn http_body_and_latency_problems_are_all_listed() {
        let o = expect(&[200], Some(300), Some("ok"), Some("^up$")).judge(
            200,
            b"nope",
            true,
            Duration::from_millis(412),
        );
        assert_eq!(o.outcome, Outcome::Fail);
        assert_eq!(
            o.message,
            "body does not contain \"ok\" (in the first 64 KiB); \
             body does not match \"^up$\" (in the first 64 KiB); \
             latency 412ms over the 300ms limit"
        );
        assert_eq!(o.value, Some(412.0));
    }

    #[test]
    fn latency_equal_to_the_limit_passes() {
        let o = expect(&[200], Some(300), None, None).judge(
            200,
            b"",
            false,
            Duration::from_millis(300),
        );
        assert_eq!(o.outcome, Outcome::Pass);
    }

    #[test]
    fn ms_formatting_keeps_one_unit() {
        assert_eq!(fmt_ms(Duration::from_micros(400)), "0.4ms");
        assert_eq!(fmt_ms(Duration::from_millis(12)), "12ms");
        assert_eq!(fmt_ms(Duration::from_secs(2)), "2000ms");
        assert_eq!(ms(Duration::from_micros(1234)), 1.234);
    }

    #[test]
    fn expiry_messages_and_values() {
        let now = 1_796_637_600.0; // 2026-12-07T10:00:00Z
        let o = expiry(
            "example.com",
            1_796_724_000,
            now,
            Duration::from_secs(14 * 86_400),
        );
        assert_eq!(o.outcome, Outcome::Fail);
        assert_eq!(
            o.message,
            "certificate for example.com expires in 1.0 days (2026-12-08T10:00:00Z), \
             less than the 14.0 days required"
        );
        assert_eq!(o.value, Some(1.0));
        assert_eq!(o.threshold, Some(14.0));
        let o = expiry(
            "example.com",
            1_796_724_000,
            now,
            Duration::from_secs(86_400),
        );
        assert_eq!(o.outcome, Outcome::Pass);
        assert_eq!(
            o.message,
            "certificate for example.com expires in 1.0 days (2026-12-08T10:00:00Z)"
        );
        let o = expiry("example.com", 1_796_551_200, now, Duration::ZERO);
        assert_eq!(o.outcome, Outcome::Fail);
        assert_eq!(
            o.message,
            "certificate for example.com expired on 2026-12-06T10:00:00Z"
        );
    }

    #[test]
    fn host_port_forms() {
        let hp = parse_host_port("db.example.com:5432").expect("name");
        assert_eq!((hp.host.as_str(), hp.port), ("db.example.com", 5432));
        let hp = parse_host_port("[::1]:443").expect("v6");
        assert_eq!((hp.host.as_str(), hp.port), ("::1", 443));
        for bad in [
            "nohost", ":80", "h:0", "h:70000", "::1:443", "[zz]:1", "[::1:1", "h:x",
        ] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_regex_is_named_by_its_field_on_one_line() {
        let e = build_err(
            "name: api\nhttp:\n  url: http://127.0.0.1/\n  bodyRegex: '(unclosed'\n",
            None,
        );
        assert_eq!(e.field, "spec.endpoints[api].http.bodyRegex");
        assert!(e.message.contains("unclosed group"), "{}", e.message);
        assert!(!e.message.contains('\n'), "{}", e.message);
        assert!(
            e.to_string()
                .starts_with("spec.endpoints[api].http.bodyRegex: ")
        );
    }

    #[test]
    fn huge_regex_hits_the_size_limit() {
        let e = compile_regex(r"\w{1000}\w{1000}\w{1000}", "f").expect_err("too big");
        assert!(e.message.contains("1 MiB"), "{}", e.message);
    }

    #[test]
    fn bad_ca_is_named_by_its_field() {
        let http = "name: api\nhttp:\n  url: https://127.0.0.1/\n  caSecretRef: {name: ca}\n";
        let e = build_err(http, Some(b"not a certificate"));
        assert_eq!(e.field, "spec.endpoints[api].http.caSecretRef");
        assert!(e.message.contains("no PEM certificate"), "{}", e.message);

        let garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let tls = "name: cert\ntls:\n  address: 127.0.0.1:443\n  caSecretRef: {name: ca}\n";
        let e = build_err(tls, Some(garbage));
        assert_eq!(e.field, "spec.endpoints[cert].tls.caSecretRef");

        let e = build_err(tls, None);
        assert_eq!(e.field, "spec.endpoints[cert].tls.caSecretRef");
        assert!(e.message.contains("has no ca.crt"), "{}", e.message);
    }

    #[test]
    fn bad_durations_are_named_by_their_field() {
        let e = build_err(
            "name: a\ntcp: {address: '127.0.0.1:1'}\ntimeout: soon\n",
            None,
        );
        assert_eq!(e.field, "spec.endpoints[a].timeout");
        let e = build_err(
            "name: a\ntcp: {address: '127.0.0.1:1'}\ntimeout: 0s\n",
            None,
        );
        assert_eq!(e.field, "spec.endpoints[a].timeout");
        let e = build_err(
            "name: a\nhttp: {url: 'http://127.0.0.1/', maxLatency: 3 parsecs}\n",
            None,
        );
        assert_eq!(e.field, "spec.endpoints[a].http.maxLatency");
        let e = build_err(
            "name: a\ntls: {address: '127.0.0.1:1', minValidFor: -1h}\n",
            None,
        );
        assert_eq!(e.field, "spec.endpoints[a].tls.minValidFor");
    }

    #[test]
    fn huge_timeouts_are_clamped() {
        let p = EndpointProbe::new(
            &endpoint("name: a\ntcp: {address: '127.0.0.1:1'}\ntimeout: 99999999h\n"),
            None,
            Resolver::System,
        )
        .expect("built");
        assert_eq!(p.timeout, MAX_TIMEOUT);
        assert_eq!(p.kind(), "tcp");
        assert_eq!(p.name(), "a");
    }

    #[test]
    fn spec_shape_errors() {
        let e = build_err("name: a\n", None);
        assert_eq!(e.field, "spec.endpoints[a]");
        let e = build_err(
            "name: a\ntcp: {address: 'a:1'}\ntls: {address: 'a:1'}\n",
            None,
        );
        assert_eq!(e.field, "spec.endpoints[a]");
        let e = build_err("name: a\nhttp: {url: 'ftp://x/'}\n", None);
        assert_eq!(e.field, "spec.endpoints[a].http.url");
        let e = build_err("name: a\ntcp: {address: 'x'}\n", None);
        assert_eq!(e.field, "spec.endpoints[a].tcp.address");
        let e = build_err(
            "name: a\ntls: {address: 'x:1', serverName: 'bad name!'}\n",
            None,
        );
        assert_eq!(e.field, "spec.endpoints[a].tls.serverName");
    }

    #[test]
    fn kinds_and_user_info_kept_out_of_messages() {
        let p = EndpointProbe::new(
            &endpoint("name: a\nhttp: {url: 'https://user:secret@127.0.0.1:1/x'}\n"),
            None,
            Resolver::System,
        )
        .expect("built");
        assert_eq!(p.kind(), "http");
        assert_eq!(p.target_text(), "https://127.0.0.1:1/x");
        let p = EndpointProbe::new(
            &endpoint("name: a\ntls: {address: '[::1]:443'}\n"),
            None,
            Resolver::System,
        )
        .expect("built");
        assert_eq!(p.kind(), "tls");
    }

    #[test]
    fn static_lookup_is_case_blind_and_misses_say_so() {
        let map = HashMap::from([("app.test".to_string(), vec![IpAddr::from([127, 0, 0, 1])])]);
        assert!(lookup_static(&map, "APP.test").is_some());
        assert!(lookup_static(&map, "other.test").is_none());
        assert_eq!(
            NotResolved("other.test".into()).to_string(),
            "other.test does not resolve (not in the static resolver map)"
        );
    }

    #[test]
    fn tls_errors_read_as_reasons() {
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert!(describe_rustls(&e).starts_with("certificate verify failed: unknown issuer"));
        let io = io::Error::new(io::ErrorKind::InvalidData, e);
        assert!(describe_io(&io).starts_with("certificate verify failed: unknown issuer"));
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(describe_io(&refused), "connection refused");
    }
}
