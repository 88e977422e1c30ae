//! The agent's configuration: tenants' pipelines (`namespace/name` + [`LogPipelineSpec`] +
//! the pods the controller found for its selector) and admins' cluster pipelines (`name` +
//! [`ClusterLogPipelineSpec`]), read from the controller-rendered `agent.yaml` or from
//! manifests, and validated into a [`Pipeline`] that cannot fail later (regexes compiled, URLs
//! parsed, durations and sizes converted, a tenant's paths derived here and nowhere else). An
//! invalid config never half-starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::api::cluster_log_pipeline::{
    ClusterLogPipeline, ClusterLogPipelineSpec, Input, Output, Parser,
};
use crate::api::common::is_dns1123_subdomain;
use crate::api::log_pipeline::{
    BufferType, Delivery, Filter, LogPipeline, LogPipelineSpec, LokiEncoding, Multiline, PodParser,
    SecretRef,
};

/// Where the kubelet keeps container logs: `<root>/<ns>_<pod>_<uid>/<container>/<n>.log`.
pub const POD_LOG_ROOT: &str = "/var/log/pods";

/// What the controller renders into the `outrider-agent` ConfigMap (key `agent.yaml`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentConfigFile {
    /// Every tenant pipeline (LogPipeline) this agent runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pipelines: Vec<PipelineEntry>,
    /// Every admin pipeline (ClusterLogPipeline) this agent runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_pipelines: Vec<ClusterPipelineEntry>,
}

/// One LogPipeline as the agent sees it: the spec and the pods its selector matched.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PipelineEntry {
    pub namespace: String,
    pub name: String,
    pub spec: LogPipelineSpec,
    /// The selected pods of `namespace` (the controller resolves the selector: the agent
    /// reads no Kubernetes API).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<PodLogs>,
}

/// A pod whose container logs a tenant pipeline ships.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodLogs {
    pub name: String,
    pub uid: String,
}

/// One ClusterLogPipeline as the agent sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterPipelineEntry {
    pub name: String,
    pub spec: ClusterLogPipelineSpec,
}

/// Where a validated pipeline came from; a pipeline restarts only when this changes.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    Pods(PipelineEntry),
    Node(ClusterPipelineEntry),
}

/// Settings of the agent (not of any pipeline) that validation needs.
#[derive(Clone, Debug)]
pub struct Sources {
    /// Where the kubelet keeps pod logs ([`POD_LOG_ROOT`] on a node).
    pub pod_log_root: PathBuf,
    /// Namespace of a ClusterLogPipeline `secretRef` that names none: the operator's.
    pub default_secret_namespace: String,
}

impl Default for Sources {
    fn default() -> Self {
        Self {
            pod_log_root: PathBuf::from(POD_LOG_ROOT),
            default_secret_namespace: "default".into(),
        }
    }
}

/// A configuration problem, naming the pipeline and the field so the user can fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid YAML for {what}: {source}")]
    Yaml {
        path: PathBuf,
        what: &'static str,
        source: serde_yaml::Error,
    },
    #[error("pipeline {pipeline}: {field}: {message}")]
    Invalid {
        pipeline: String,
        field: String,
        message: String,
    },
    #[error("pipeline {0} is defined twice")]
    Duplicate(String),
}

/// A validated pipeline, ready to run.
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// `namespace/name` of a LogPipeline, `name` of a ClusterLogPipeline (names hold no `/`).
    pub key: String,
    pub source: Source,
    pub inputs: Vec<InputConfig>,
    pub fields: BTreeMap<String, String>,
    pub filters: Vec<FilterConfig>,
    pub outputs: Vec<OutputConfig>,
    pub batch: BatchConfig,
    pub buffer_bytes: usize,
    /// Spool to disk (`buffer.type: disk`) instead of holding records in memory.
    pub disk_buffer: bool,
}

impl Pipeline {
    /// The delivery settings as written (sizes unparsed), for messages.
    pub fn delivery(&self) -> &Delivery {
        match &self.source {
            Source::Pods(e) => &e.spec.delivery,
            Source::Node(e) => &e.spec.delivery,
        }
    }
}

/// A validated input.
#[derive(Clone, Debug)]
pub struct InputConfig {
    pub name: String,
    pub paths: Vec<String>,
    pub exclude: Vec<glob::Pattern>,
    pub multiline: Option<MultilineConfig>,
    /// Lines are in the container runtime's (CRI) format: the framing is removed and partial
    /// lines joined before `parser` sees the content.
    pub cri: bool,
    pub parser: ParserConfig,
    /// `<pod log root>/`: files beneath it get `namespace`, `pod` and `container` fields.
    pub pod_root: String,
}

/// Multiline joining with a compiled start pattern.
#[derive(Clone, Debug)]
pub struct MultilineConfig {
    pub start: Regex,
    pub flush_timeout: Duration,
}

/// The parser with what it needs compiled.
#[derive(Clone, Debug)]
pub enum ParserConfig {
    None,
    Json,
    Regex(Regex),
}

/// A compiled filter.
#[derive(Clone, Debug)]
pub struct FilterConfig {
    pub include: bool,
    /// Tested field; `message` when absent.
    pub field: Option<String>,
    pub pattern: Regex,
}

/// A validated output.
#[derive(Clone, Debug)]
pub struct OutputConfig {
    pub name: String,
    pub kind: OutputKind,
    /// `insecureAllowHttpCredentials`: a Secret's credentials may go over plain `http://`.
    pub insecure_http_credentials: bool,
    /// `tls.replaceRoots`: trust only the Secret's `ca.crt` (checked to name a Secret).
    pub replace_roots: bool,
}

/// A Secret as the agent finds it: `<secret dir>/<namespace>/<name>/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretName {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for SecretName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where an output ships to; URLs are parsed.
#[derive(Clone, Debug)]
pub enum OutputKind {
    Loki {
        url: reqwest::Url,
        /// Label name and its parsed value template, in label-name order.
        labels: Vec<(String, crate::agent::record::Template)>,
        tenant_id: Option<String>,
        encoding: LokiEncoding,
        secret: Option<SecretName>,
    },
    Elasticsearch {
        url: reqwest::Url,
        index: String,
        secret: Option<SecretName>,
    },
    Http {
        url: reqwest::Url,
        secret: Option<SecretName>,
    },
    File {
        path: PathBuf,
    },
    Stdout,
}

/// Batch limits in plain numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    pub max_events: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
}

/// Loads `agent.yaml` and validates every pipeline in it.
pub fn load_agent_file(path: &Path, sources: &Sources) -> Result<Vec<Pipeline>, ConfigError> {
    let text = read(path)?;
    let file: AgentConfigFile =
        serde_yaml::from_str(&text).map_err(|source| ConfigError::Yaml {
            path: path.to_path_buf(),
            what: "the agent configuration",
            source,
        })?;
    validate_all(file, sources)
}

/// Loads LogPipeline and ClusterLogPipeline manifests (one or more YAML documents per file)
/// and validates them. A LogPipeline given this way selects no pods (there is no API to
/// resolve its selector), so it reads nothing; it is accepted to check its spec.
pub fn load_manifests(paths: &[PathBuf], sources: &Sources) -> Result<Vec<Pipeline>, ConfigError> {
    let mut file = AgentConfigFile::default();
    for path in paths {
        let text = read(path)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let yaml = |source| ConfigError::Yaml {
                path: path.clone(),
                what: "a LogPipeline or ClusterLogPipeline",
                source,
            };
            let value = serde_yaml::Value::deserialize(doc).map_err(yaml)?;
            if value.is_null() {
                continue;
            }
            if value.get("kind").and_then(|k| k.as_str()) == Some("ClusterLogPipeline") {
                let clp: ClusterLogPipeline = serde_yaml::from_value(value).map_err(yaml)?;
                file.cluster_pipelines.push(ClusterPipelineEntry {
                    name: clp.metadata.name.clone().unwrap_or_default(),
                    spec: clp.spec,
                });
            } else {
                let lp: LogPipeline = serde_yaml::from_value(value).map_err(yaml)?;
                file.pipelines.push(PipelineEntry {
                    namespace: lp
                        .metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                    name: lp.metadata.name.clone().unwrap_or_default(),
                    spec: lp.spec,
                    pods: Vec::new(),
                });
            }
        }
    }
    validate_all(file, sources)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Validates every entry; the first problem wins (and names its pipeline and field).
pub fn validate_all(
    file: AgentConfigFile,
    sources: &Sources,
) -> Result<Vec<Pipeline>, ConfigError> {
    let tenants = file.pipelines.into_iter().map(|e| validate(e, sources));
    let admins = file
        .cluster_pipelines
        .into_iter()
        .map(|e| validate_cluster(e, sources));
    let mut out: Vec<Pipeline> = Vec::new();
    for p in tenants.chain(admins) {
        let p = p?;
        if out.iter().any(|o| o.key == p.key) {
            return Err(ConfigError::Duplicate(p.key));
        }
        out.push(p);
    }
    Ok(out)
}

/// A problem as `(field, message)`, named in full by the caller.
type Bad = (String, String);

/// Validates a tenant's LogPipeline: its one input is derived here from the pods the
/// controller resolved, always beneath `<pod log root>/<its namespace>_<pod>_<uid>/`, every
/// name checked so none can reach a path join as `..` or a glob.
pub fn validate(entry: PipelineEntry, sources: &Sources) -> Result<Pipeline, ConfigError> {
    let key = format!("{}/{}", entry.namespace, entry.name);
    let named = |(field, message): Bad| ConfigError::Invalid {
        pipeline: key.clone(),
        field,
        message,
    };
    if entry.name.is_empty() {
        return Err(named(("metadata.name".into(), "must be set".into())));
    }
    if !is_dns1123_label(&entry.namespace) {
        return Err(named((
            "metadata.namespace".into(),
            format!("{:?} is not a namespace name", entry.namespace),
        )));
    }
    let spec = &entry.spec;
    let paths = pod_paths(&entry, &sources.pod_log_root).map_err(named)?;
    let parser = parser_config(
        match spec.parser {
            PodParser::None => Parser::None,
            PodParser::Json => Parser::Json,
            PodParser::Regex => Parser::Regex,
        },
        spec.pattern.as_deref(),
        "spec.pattern",
    )
    .map_err(named)?;
    let input = InputConfig {
        name: "pods".into(),
        paths,
        exclude: Vec::new(),
        multiline: multiline_config(spec.multiline.as_ref(), "spec.multiline").map_err(named)?,
        cri: true,
        parser,
        pod_root: pod_root(&sources.pod_log_root),
    };
    let own = |r: Option<&SecretRef>, at: &str| -> Result<Option<SecretName>, Bad> {
        let Some(r) = r else { return Ok(None) };
        match &r.namespace {
            Some(ns) if *ns != entry.namespace => Err((
                format!("{at}.secretRef.namespace"),
                "a LogPipeline reads Secrets of its own namespace only".into(),
            )),
            _ => Ok(Some(secret_name(r, &entry.namespace))),
        }
    };
    let mut outputs = Vec::new();
    for (i, o) in spec.outputs.iter().enumerate() {
        let at = format!("spec.outputs[{i}]");
        let as_output = Output {
            name: o.name.clone(),
            loki: o.loki.clone(),
            elasticsearch: o.elasticsearch.clone(),
            http: o.http.clone(),
            file: None,
            stdout: None,
        };
        let secret = own(o.secret_ref(), &at).map_err(named)?;
        outputs.push(output_config(&as_output, &at, &outputs, secret).map_err(named)?);
    }
    let common = common(&spec.fields, &spec.filters, outputs, &spec.delivery).map_err(named)?;
    Ok(common.into_pipeline(key, Source::Pods(entry), vec![input]))
}

/// Validates an admin's ClusterLogPipeline: what the CRD schema cannot check (regexes
/// compile, URLs parse, names are unique) is checked here, because manifests given with
/// `--pipeline` never met an API server. Where its paths may point is the confinement's
/// business ([`super::confine::check_pipeline`]).
pub fn validate_cluster(
    entry: ClusterPipelineEntry,
    sources: &Sources,
) -> Result<Pipeline, ConfigError> {
    let key = entry.name.clone();
    let named = |(field, message): Bad| ConfigError::Invalid {
        pipeline: key.clone(),
        field,
        message,
    };
    if !is_dns1123_subdomain(&entry.name) {
        return Err(named((
            "metadata.name".into(),
            format!("{:?} is not a DNS-1123 subdomain", entry.name),
        )));
    }
    let spec = &entry.spec;
    if spec.inputs.is_empty() {
        return Err(named(("spec.inputs".into(), "at least one input".into())));
    }
    let mut inputs: Vec<InputConfig> = Vec::new();
    for (i, input) in spec.inputs.iter().enumerate() {
        let at = format!("spec.inputs[{i}]");
        if inputs.iter().any(|x| x.name == input.name) {
            return Err(named((
                format!("{at}.name"),
                format!("duplicate name {:?}", input.name),
            )));
        }
        inputs.push(input_config(input, &at, &sources.pod_log_root).map_err(named)?);
    }
    let mut outputs = Vec::new();
    for (i, o) in spec.outputs.iter().enumerate() {
        let at = format!("spec.outputs[{i}]");
        let secret = o.secret_ref().map(|r| {
            let ns = r
                .namespace
                .as_deref()
                .unwrap_or(&sources.default_secret_namespace);
            secret_name(r, ns)
        });
        outputs.push(output_config(o, &at, &outputs, secret).map_err(named)?);
    }
    let common = common(&spec.fields, &spec.filters, outputs, &spec.delivery).map_err(named)?;
    Ok(common.into_pipeline(key, Source::Node(entry), inputs))
}

/// The globs of a tenant's pods: `<root>/<ns>_<pod>_<uid>/<container or *>/*.log`.
fn pod_paths(entry: &PipelineEntry, root: &Path) -> Result<Vec<String>, Bad> {
    for (j, c) in entry.spec.pods.containers.iter().enumerate() {
        if !is_dns1123_label(c) {
            return Err((
                format!("spec.pods.containers[{j}]"),
                format!("{c:?} is not a container name"),
            ));
        }
    }
    let containers: Vec<&str> = if entry.spec.pods.containers.is_empty() {
        vec!["*"]
    } else {
        entry
            .spec
            .pods
            .containers
            .iter()
            .map(String::as_str)
            .collect()
    };
    let mut paths = Vec::new();
    for (j, pod) in entry.pods.iter().enumerate() {
        if !is_dns1123_subdomain(&pod.name) {
            return Err((
                format!("pods[{j}].name"),
                format!("{:?} is not a pod name", pod.name),
            ));
        }
        let uid_ok = !pod.uid.is_empty()
            && pod.uid.len() <= 64
            && pod
                .uid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !uid_ok {
            return Err((
                format!("pods[{j}].uid"),
                format!("{:?} is not a pod uid", pod.uid),
            ));
        }
        for c in &containers {
            let dir = root.join(format!("{}_{}_{}", entry.namespace, pod.name, pod.uid));
            paths.push(format!("{}/{c}/*.log", dir.display()));
        }
    }
    Ok(paths)
}

fn pod_root(root: &Path) -> String {
    format!("{}/", root.display().to_string().trim_end_matches('/'))
}

fn is_dns1123_label(s: &str) -> bool {
    s.len() <= 63 && !s.contains('.') && is_dns1123_subdomain(s)
}

fn input_config(input: &Input, at: &str, pod_log_root: &Path) -> Result<InputConfig, Bad> {
    if input.paths.is_empty() {
        return Err((format!("{at}.paths"), "at least one path".into()));
    }
    for (j, p) in input.paths.iter().enumerate() {
        if !p.starts_with('/') {
            return Err((format!("{at}.paths[{j}]"), "must be absolute".into()));
        }
        glob::Pattern::new(p)
            .map_err(|e| (format!("{at}.paths[{j}]"), format!("bad glob: {e}")))?;
    }
    let exclude = input
        .exclude
        .iter()
        .enumerate()
        .map(|(j, p)| {
            glob::Pattern::new(p)
                .map_err(|e| (format!("{at}.exclude[{j}]"), format!("bad glob: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cri = input.parser == Parser::Cri;
    let parser = parser_config(
        input.parser,
        input.pattern.as_deref(),
        &format!("{at}.pattern"),
    )?;
    Ok(InputConfig {
        name: input.name.clone(),
        paths: input.paths.clone(),
        exclude,
        multiline: multiline_config(input.multiline.as_ref(), &format!("{at}.multiline"))?,
        cri,
        parser,
        pod_root: pod_root(pod_log_root),
    })
}

fn multiline_config(m: Option<&Multiline>, at: &str) -> Result<Option<MultilineConfig>, Bad> {
    let Some(m) = m else { return Ok(None) };
    Ok(Some(MultilineConfig {
        start: compile_regex(&m.start_pattern)
            .map_err(|e| (format!("{at}.startPattern"), e.to_string()))?,
        flush_timeout: m
            .flush_timeout
            .to_std()
            .map_err(|e| (format!("{at}.flushTimeout"), e.to_string()))?,
    }))
}

/// `parser` (`cri` is framing, not a parser: [`InputConfig::cri`]) with `pattern` at `at`.
fn parser_config(parser: Parser, pattern: Option<&str>, at: &str) -> Result<ParserConfig, Bad> {
    Ok(match (parser, pattern) {
        (Parser::Regex, Some(p)) => {
            ParserConfig::Regex(compile_regex(p).map_err(|e| (at.to_string(), e.to_string()))?)
        }
        (Parser::Regex, None) => {
            return Err((at.to_string(), "required when parser is regex".into()));
        }
        (_, Some(_)) => return Err((at.to_string(), "only used with parser regex".into())),
        (Parser::None | Parser::Cri, None) => ParserConfig::None,
        (Parser::Json, None) => ParserConfig::Json,
    })
}

/// The Secret `r` in `namespace`. Its names are checked where they become path components
/// ([`super::sink::SecretMaterial::read`]), so a bad one refuses only its own pipeline.
fn secret_name(r: &SecretRef, namespace: &str) -> SecretName {
    SecretName {
        namespace: namespace.to_string(),
        name: r.name.clone(),
    }
}

fn output_config(
    o: &Output,
    at: &str,
    before: &[OutputConfig],
    secret: Option<SecretName>,
) -> Result<OutputConfig, Bad> {
    if before.iter().any(|x| x.name == o.name) {
        return Err((format!("{at}.name"), format!("duplicate name {:?}", o.name)));
    }
    let kind = output_kind(o, secret).map_err(|(field, msg)| (format!("{at}{field}"), msg))?;
    let replace_roots =
        super::tls_roots::replace_roots(o).map_err(|(field, msg)| (format!("{at}{field}"), msg))?;
    let insecure_http_credentials = o
        .loki
        .as_ref()
        .map(|x| x.insecure_allow_http_credentials)
        .or_else(|| {
            o.elasticsearch
                .as_ref()
                .map(|x| x.insecure_allow_http_credentials)
        })
        .or_else(|| o.http.as_ref().map(|x| x.insecure_allow_http_credentials))
        .unwrap_or(false);
    Ok(OutputConfig {
        name: o.name.clone(),
        kind,
        insecure_http_credentials,
        replace_roots,
    })
}

/// What both kinds validate alike.
struct Common {
    fields: BTreeMap<String, String>,
    filters: Vec<FilterConfig>,
    outputs: Vec<OutputConfig>,
    batch: BatchConfig,
    buffer_bytes: usize,
    disk_buffer: bool,
}

impl Common {
    fn into_pipeline(self, key: String, source: Source, inputs: Vec<InputConfig>) -> Pipeline {
        Pipeline {
            key,
            source,
            inputs,
            fields: self.fields,
            filters: self.filters,
            outputs: self.outputs,
            batch: self.batch,
            buffer_bytes: self.buffer_bytes,
            disk_buffer: self.disk_buffer,
        }
    }
}

fn common(
    fields: &BTreeMap<String, String>,
    filters: &[Filter],
    outputs: Vec<OutputConfig>,
    delivery: &Delivery,
) -> Result<Common, Bad> {
    if outputs.is_empty() {
        return Err(("spec.outputs".into(), "at least one output".into()));
    }
    let filters = filters
        .iter()
        .enumerate()
        .map(|(i, f)| {
            compile_filter(f).map_err(|(field, msg)| (format!("spec.filters[{i}]{field}"), msg))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let b = &delivery.batch;
    let batch = BatchConfig {
        max_events: (b.max_events as usize).max(1),
        max_bytes: parse_byte_size(&b.max_bytes)
            .ok_or_else(|| {
                (
                    "spec.delivery.batch.maxBytes".to_string(),
                    format!("bad size {:?}", b.max_bytes),
                )
            })?
            .max(1),
        max_wait: b
            .max_wait
            .to_std()
            .map_err(|e| ("spec.delivery.batch.maxWait".to_string(), e.to_string()))?,
    };
    let buf = &delivery.buffer;
    let buffer_bytes = parse_byte_size(&buf.max_size).ok_or_else(|| {
        (
            "spec.delivery.buffer.maxSize".to_string(),
            format!("bad size {:?}", buf.max_size),
        )
    })?;
    if buffer_bytes < batch.max_bytes {
        return Err((
            "spec.delivery.buffer.maxSize".into(),
            "must be at least spec.delivery.batch.maxBytes".into(),
        ));
    }
    Ok(Common {
        fields: fields.clone(),
        filters,
        outputs,
        batch,
        buffer_bytes,
        disk_buffer: buf.type_ == BufferType::Disk,
    })
}

fn compile_filter(f: &Filter) -> Result<FilterConfig, (String, String)> {
    let (include, m, name) = match (&f.include, &f.exclude) {
        (Some(m), None) => (true, m, ".include"),
        (None, Some(m)) => (false, m, ".exclude"),
        _ => {
            return Err((
                String::new(),
                "exactly one of include or exclude must be set".into(),
            ));
        }
    };
    let pattern =
        compile_regex(&m.pattern).map_err(|e| (format!("{name}.pattern"), e.to_string()))?;
    Ok(FilterConfig {
        include,
        field: m.field.clone(),
        pattern,
    })
}

fn parse_url(s: &str, field: &str) -> Result<reqwest::Url, (String, String)> {
    let url = reqwest::Url::parse(s).map_err(|e| (field.to_string(), format!("{s:?}: {e}")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err((
            field.to_string(),
            format!("{s:?}: scheme must be http or https"),
        ));
    }
    Ok(url)
}

fn output_kind(o: &Output, secret: Option<SecretName>) -> Result<OutputKind, Bad> {
    let set = [
        o.loki.is_some(),
        o.elasticsearch.is_some(),
        o.http.is_some(),
        o.file.is_some(),
        o.stdout.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if set != 1 {
        return Err((
            String::new(),
            "exactly one of loki, elasticsearch, http, file or stdout must be set".into(),
        ));
    }
    if let Some(l) = &o.loki {
        let labels = l
            .labels
            .iter()
            .map(|(k, v)| {
                crate::agent::record::Template::parse(v)
                    .map(|t| (k.clone(), t))
                    .map_err(|e| (format!(".loki.labels.{k}"), e))
            })
            .collect::<Result<_, _>>()?;
        return Ok(OutputKind::Loki {
            url: parse_url(&l.url, ".loki.url")?,
            labels,
            tenant_id: l.tenant_id.clone(),
            encoding: l.encoding,
            secret,
        });
    }
    if let Some(e) = &o.elasticsearch {
        return Ok(OutputKind::Elasticsearch {
            url: parse_url(&e.url, ".elasticsearch.url")?,
            index: e.index.clone(),
            secret,
        });
    }
    if let Some(h) = &o.http {
        return Ok(OutputKind::Http {
            url: parse_url(&h.url, ".http.url")?,
            secret,
        });
    }
    if let Some(f) = &o.file {
        if !f.path.starts_with('/') {
            return Err((".file.path".into(), "must be absolute".into()));
        }
        return Ok(OutputKind::File {
            path: PathBuf::from(&f.path),
        });
    }
    Ok(OutputKind::Stdout)
}

impl OutputKind {
    /// The Secret an HTTP-based output names, its namespace resolved.
    pub fn secret(&self) -> Option<&SecretName> {
        match self {
            OutputKind::Loki { secret, .. }
            | OutputKind::Elasticsearch { secret, .. }
            | OutputKind::Http { secret, .. } => secret.as_ref(),
            OutputKind::File { .. } | OutputKind::Stdout => None,
        }
    }

    /// An HTTP-based output whose URL is `http://` (credentials would travel in clear).
    pub fn is_plain_http(&self) -> bool {
        match self {
            OutputKind::Loki { url, .. }
            | OutputKind::Elasticsearch { url, .. }
            | OutputKind::Http { url, .. } => url.scheme() == "http",
            OutputKind::File { .. } | OutputKind::Stdout => false,
        }
    }
}

/// Most memory one compiled pattern may take, and its lazy DFA's cache: a tenant's regex
/// (`(\w{100}){100}`, 14 bytes, compiles to megabytes) must not take a node's memory.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
pub const REGEX_DFA_SIZE_LIMIT: usize = 2 << 20;

/// Compiles a pipeline's regex within [`REGEX_SIZE_LIMIT`] and [`REGEX_DFA_SIZE_LIMIT`].
pub fn compile_regex(pattern: &str) -> Result<Regex, regex::Error> {
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_SIZE_LIMIT)
        .build()
}

/// Parses `1048576`, `64Ki`, `1Mi`, `2G` (the CRD's byte-size pattern).
pub fn parse_byte_size(s: &str) -> Option<usize> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits);
    let n: usize = num.parse().ok()?;
    let mult: usize = match suffix {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(yaml: &str) -> ClusterPipelineEntry {
        ClusterPipelineEntry {
            name: "shop".into(),
            spec: serde_yaml::from_str(yaml).unwrap(),
        }
    }

    fn validate(e: ClusterPipelineEntry) -> Result<Pipeline, ConfigError> {
        validate_cluster(e, &Sources::default())
    }

    fn tenant(yaml: &str, pods: &[(&str, &str)]) -> PipelineEntry {
        PipelineEntry {
            namespace: "prod".into(),
            name: "shop".into(),
            spec: serde_yaml::from_str(yaml).unwrap(),
            pods: pods
                .iter()
                .map(|(name, uid)| PodLogs {
                    name: name.to_string(),
                    uid: uid.to_string(),
                })
                .collect(),
        }
    }

    const TENANT: &str = r#"
pods: {selector: {matchLabels: {app: shop}}, containers: [api]}
parser: json
outputs: [{name: out, http: {url: "http://127.0.0.1:9/ingest", secretRef: {name: creds}}}]
"#;

    #[test]
    fn a_tenant_pipeline_reads_only_its_own_pods_directories_under_the_pod_root() {
        let sources = Sources {
            pod_log_root: PathBuf::from("/tmp/pods"),
            ..Sources::default()
        };
        let p = super::validate(
            tenant(TENANT, &[("shop-1", "u-1"), ("shop-2", "u-2")]),
            &sources,
        )
        .unwrap();
        assert_eq!(p.key, "prod/shop");
        assert!(matches!(p.source, Source::Pods(_)));
        let input = &p.inputs[0];
        assert_eq!(
            input.paths,
            [
                "/tmp/pods/prod_shop-1_u-1/api/*.log",
                "/tmp/pods/prod_shop-2_u-2/api/*.log"
            ]
        );
        assert!(input.cri && matches!(input.parser, ParserConfig::Json));
        assert_eq!(input.pod_root, "/tmp/pods/");
        let OutputKind::Http { secret, .. } = &p.outputs[0].kind else {
            panic!("not http")
        };
        assert_eq!(
            secret.as_ref().map(ToString::to_string).as_deref(),
            Some("prod/creds")
        );
        // every container when none is named
        let all = TENANT.replace(", containers: [api]", "");
        let p = super::validate(tenant(&all, &[("shop-1", "u-1")]), &sources).unwrap();
        assert_eq!(p.inputs[0].paths, ["/tmp/pods/prod_shop-1_u-1/*/*.log"]);
    }

    #[test]
    fn a_tenant_pipeline_cannot_name_another_namespace_or_smuggle_a_path() {
        let s = Sources::default();
        let err = |yaml: &str, pods: &[(&str, &str)]| {
            super::validate(tenant(yaml, pods), &s)
                .unwrap_err()
                .to_string()
        };
        let other = TENANT.replace("{name: creds}", "{name: creds, namespace: kube-system}");
        assert!(
            err(&other, &[]).contains("spec.outputs[0].secretRef.namespace"),
            "{}",
            err(&other, &[])
        );
        let e = err(TENANT, &[("../../etc", "u")]);
        assert!(e.contains("pods[0].name"), "{e}");
        let e = err(TENANT, &[("shop", "*")]);
        assert!(e.contains("pods[0].uid"), "{e}");
        let e = err(&TENANT.replace("[api]", "['*']"), &[("shop", "u")]);
        assert!(e.contains("spec.pods.containers[0]"), "{e}");
        let mut bad_ns = tenant(TENANT, &[]);
        bad_ns.namespace = "a/b".into();
        let e = super::validate(bad_ns, &s).unwrap_err().to_string();
        assert!(e.contains("metadata.namespace"), "{e}");
    }

    #[test]
    fn a_cluster_secret_ref_without_namespace_reads_the_default_namespace() {
        let yaml = OK.replace(
            r#"http: {url: "http://127.0.0.1:9/ingest"}"#,
            r#"http: {url: "http://127.0.0.1:9/ingest", secretRef: {name: creds}}"#,
        );
        let s = Sources {
            default_secret_namespace: "outrider".into(),
            ..Sources::default()
        };
        let p = validate_cluster(entry(&yaml), &s).unwrap();
        let OutputKind::Http { secret, .. } = &p.outputs[0].kind else {
            panic!("not http")
        };
        assert_eq!(secret.as_ref().unwrap().to_string(), "outrider/creds");
        assert!(!matches!(p.source, Source::Pods(_)));
    }

    const OK: &str = r#"
inputs: [{name: app, paths: ["/var/log/app/*.log"], exclude: ["*.gz"], parser: json}]
fields: {service: shop}
filters: [{include: {field: level, pattern: "ERROR|WARN"}}]
outputs: [{name: out, http: {url: "http://127.0.0.1:9/ingest"}}]
delivery: {batch: {maxEvents: 10, maxBytes: 64Ki, maxWait: 200ms}, buffer: {maxSize: 1Mi}}
"#;

    #[test]
    fn valid_pipeline_compiles_sizes_and_durations() {
        let p = validate(entry(OK)).unwrap();
        assert_eq!(p.key, "shop");
        assert_eq!(p.batch.max_events, 10);
        assert_eq!(p.batch.max_bytes, 64 * 1024);
        assert_eq!(p.batch.max_wait, Duration::from_millis(200));
        assert_eq!(p.buffer_bytes, 1 << 20);
        assert!(matches!(p.inputs[0].parser, ParserConfig::Json));
    }

    #[test]
    fn a_regex_that_compiles_too_big_is_refused_naming_the_field() {
        let yaml = OK.replace("ERROR|WARN", r"(\\w{100}){100}");
        let err = validate(entry(&yaml)).unwrap_err().to_string();
        assert!(
            err.contains("spec.filters[0]") && err.contains("size limit"),
            "{err}"
        );
    }

    #[test]
    fn invalid_filter_regex_names_pipeline_and_field() {
        let yaml = OK.replace("ERROR|WARN", "ERROR(");
        let err = validate(entry(&yaml)).unwrap_err().to_string();
        assert!(err.contains("pipeline shop:"), "{err}");
        assert!(err.contains("spec.filters[0].include.pattern"), "{err}");
    }

    #[test]
    fn invalid_url_names_output_field() {
        let yaml = OK.replace("http://127.0.0.1:9/ingest", "http://exa mple");
        let err = validate(entry(&yaml)).unwrap_err().to_string();
        assert!(err.contains("spec.outputs[0].http.url"), "{err}");
    }

    #[test]
    fn regex_parser_without_pattern_is_rejected() {
        let yaml = OK.replace("parser: json", "parser: regex");
        let err = validate(entry(&yaml)).unwrap_err().to_string();
        assert!(err.contains("spec.inputs[0].pattern"), "{err}");
    }

    #[test]
    fn loki_encoding_defaults_to_json_and_accepts_protobuf() {
        let loki = |extra: &str| {
            OK.replace(
                r#"http: {url: "http://127.0.0.1:9/ingest"}"#,
                &format!(r#"loki: {{url: "http://127.0.0.1:9"{extra}}}"#),
            )
        };
        let encoding = |yaml: &str| match validate(entry(yaml)).unwrap().outputs[0].kind {
            OutputKind::Loki { encoding, .. } => encoding,
            ref other => panic!("not a Loki output: {other:?}"),
        };
        assert_eq!(encoding(&loki("")), LokiEncoding::Json);
        assert_eq!(
            encoding(&loki(", encoding: protobuf")),
            LokiEncoding::Protobuf
        );
        let err = serde_yaml::from_str::<ClusterLogPipelineSpec>(&loki(", encoding: thrift"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("thrift"), "{err}");
    }

    #[test]
    fn byte_sizes_parse_binary_and_decimal_suffixes() {
        assert_eq!(parse_byte_size("1Mi"), Some(1 << 20));
        assert_eq!(parse_byte_size("2k"), Some(2000));
        assert_eq!(parse_byte_size("17"), Some(17));
        assert_eq!(parse_byte_size("1Xi"), None);
        assert_eq!(parse_byte_size(""), None);
    }

    #[test]
    fn manifests_with_several_documents_load_each_pipeline() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("lp.yaml");
        let doc = |name: &str| {
            format!(
                "apiVersion: outrider.dev/v1alpha1\nkind: ClusterLogPipeline\nmetadata: {{name: {name}}}\nspec:\n{}",
                OK.lines().map(|l| format!("  {l}\n")).collect::<String>()
            )
        };
        let tenant_doc = format!(
            "apiVersion: outrider.dev/v1alpha1\nkind: LogPipeline\nmetadata: {{name: t, namespace: ns}}\nspec:\n{}",
            TENANT
                .lines()
                .map(|l| format!("  {l}\n"))
                .collect::<String>()
        );
        std::fs::write(
            &f,
            format!("{}---\n{}---\n{tenant_doc}", doc("a"), doc("b")),
        )
        .unwrap();
        let ps = load_manifests(&[f], &Sources::default()).unwrap();
        let keys: Vec<_> = ps.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["ns/t", "a", "b"]);
        assert!(
            ps[0].inputs[0].paths.is_empty(),
            "no pods without a controller"
        );
    }
}
