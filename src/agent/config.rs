//! The agent's configuration: a list of pipelines (`namespace/name` + [`LogPipelineSpec`]),
//! read from the controller-rendered `agent.yaml` or from LogPipeline manifests, and
//! validated into a [`Pipeline`] that cannot fail later (regexes compiled, URLs parsed,
//! durations and sizes converted). An invalid config never half-starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::api::log_pipeline::{
    BufferType, Filter, LogPipeline, LogPipelineSpec, LokiEncoding, Output, Parser,
};

/// What the controller renders into the `outrider-agent` ConfigMap (key `agent.yaml`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentConfigFile {
    /// Every pipeline this agent runs.
    #[serde(default)]
    pub pipelines: Vec<PipelineEntry>,
}

/// One LogPipeline as the agent sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PipelineEntry {
    pub namespace: String,
    pub name: String,
    pub spec: LogPipelineSpec,
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
    /// `namespace/name`.
    pub key: String,
    pub spec: LogPipelineSpec,
    pub inputs: Vec<InputConfig>,
    pub fields: BTreeMap<String, String>,
    pub filters: Vec<FilterConfig>,
    pub outputs: Vec<OutputConfig>,
    pub batch: BatchConfig,
    pub buffer_bytes: usize,
    /// Spool to disk (`buffer.type: disk`) instead of holding records in memory.
    pub disk_buffer: bool,
}

/// A validated input.
#[derive(Clone, Debug)]
pub struct InputConfig {
    pub name: String,
    pub paths: Vec<String>,
    pub exclude: Vec<glob::Pattern>,
    pub multiline: Option<MultilineConfig>,
    pub parser: ParserConfig,
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
    Cri,
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

/// Where an output ships to; URLs are parsed.
#[derive(Clone, Debug)]
pub enum OutputKind {
    Loki {
        url: reqwest::Url,
        labels: BTreeMap<String, String>,
        tenant_id: Option<String>,
        encoding: LokiEncoding,
        secret: Option<String>,
    },
    Elasticsearch {
        url: reqwest::Url,
        index: String,
        secret: Option<String>,
    },
    Http {
        url: reqwest::Url,
        secret: Option<String>,
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
pub fn load_agent_file(path: &Path) -> Result<Vec<Pipeline>, ConfigError> {
    let text = read(path)?;
    let file: AgentConfigFile =
        serde_yaml::from_str(&text).map_err(|source| ConfigError::Yaml {
            path: path.to_path_buf(),
            what: "the agent configuration",
            source,
        })?;
    validate_all(file.pipelines)
}

/// Loads LogPipeline manifests (one or more YAML documents per file) and validates them.
pub fn load_manifests(paths: &[PathBuf]) -> Result<Vec<Pipeline>, ConfigError> {
    let mut entries = Vec::new();
    for path in paths {
        let text = read(path)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value =
                serde_yaml::Value::deserialize(doc).map_err(|source| ConfigError::Yaml {
                    path: path.clone(),
                    what: "a LogPipeline",
                    source,
                })?;
            if value.is_null() {
                continue;
            }
            let lp: LogPipeline =
                serde_yaml::from_value(value).map_err(|source| ConfigError::Yaml {
                    path: path.clone(),
                    what: "a LogPipeline",
                    source,
                })?;
            entries.push(PipelineEntry {
                namespace: lp
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                name: lp.metadata.name.clone().unwrap_or_default(),
                spec: lp.spec,
            });
        }
    }
    validate_all(entries)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Validates every entry; the first problem wins (and names its pipeline and field).
pub fn validate_all(entries: Vec<PipelineEntry>) -> Result<Vec<Pipeline>, ConfigError> {
    let mut out: Vec<Pipeline> = Vec::with_capacity(entries.len());
    for entry in entries {
        let p = validate(entry)?;
        if out.iter().any(|o| o.key == p.key) {
            return Err(ConfigError::Duplicate(p.key));
        }
        out.push(p);
    }
    Ok(out)
}

/// Validates one pipeline: what the CRD schema cannot check (regexes compile, URLs parse,
/// names are unique) is checked here, because `--pipeline` files never met an API server.
pub fn validate(entry: PipelineEntry) -> Result<Pipeline, ConfigError> {
    let key = format!("{}/{}", entry.namespace, entry.name);
    let bad = |field: String, message: String| ConfigError::Invalid {
        pipeline: key.clone(),
        field,
        message,
    };
    if entry.name.is_empty() {
        return Err(bad("metadata.name".into(), "must be set".into()));
    }
    let spec = entry.spec;
    if spec.inputs.is_empty() {
        return Err(bad("spec.inputs".into(), "at least one input".into()));
    }
    if spec.outputs.is_empty() {
        return Err(bad("spec.outputs".into(), "at least one output".into()));
    }
    let mut inputs = Vec::new();
    for (i, input) in spec.inputs.iter().enumerate() {
        let at = format!("spec.inputs[{i}]");
        if inputs.iter().any(|x: &InputConfig| x.name == input.name) {
            return Err(bad(
                format!("{at}.name"),
                format!("duplicate name {:?}", input.name),
            ));
        }
        if input.paths.is_empty() {
            return Err(bad(format!("{at}.paths"), "at least one path".into()));
        }
        for (j, p) in input.paths.iter().enumerate() {
            if !p.starts_with('/') {
                return Err(bad(format!("{at}.paths[{j}]"), "must be absolute".into()));
            }
            glob::Pattern::new(p)
                .map_err(|e| bad(format!("{at}.paths[{j}]"), format!("bad glob: {e}")))?;
        }
        let exclude = input
            .exclude
            .iter()
            .enumerate()
            .map(|(j, p)| {
                glob::Pattern::new(p)
                    .map_err(|e| bad(format!("{at}.exclude[{j}]"), format!("bad glob: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let multiline = match &input.multiline {
            None => None,
            Some(m) => Some(MultilineConfig {
                start: compile_regex(&m.start_pattern)
                    .map_err(|e| bad(format!("{at}.multiline.startPattern"), e.to_string()))?,
                flush_timeout: m
                    .flush_timeout
                    .to_std()
                    .map_err(|e| bad(format!("{at}.multiline.flushTimeout"), e.to_string()))?,
            }),
        };
        let parser = match (input.parser, &input.pattern) {
            (Parser::Regex, Some(p)) => ParserConfig::Regex(
                compile_regex(p).map_err(|e| bad(format!("{at}.pattern"), e.to_string()))?,
            ),
            (Parser::Regex, None) => {
                return Err(bad(
                    format!("{at}.pattern"),
                    "required when parser is regex".into(),
                ));
            }
            (_, Some(_)) => {
                return Err(bad(
                    format!("{at}.pattern"),
                    "only used with parser regex".into(),
                ));
            }
            (Parser::None, None) => ParserConfig::None,
            (Parser::Json, None) => ParserConfig::Json,
            (Parser::Cri, None) => ParserConfig::Cri,
        };
        inputs.push(InputConfig {
            name: input.name.clone(),
            paths: input.paths.clone(),
            exclude,
            multiline,
            parser,
        });
    }
    let filters = spec
        .filters
        .iter()
        .enumerate()
        .map(|(i, f)| {
            compile_filter(f).map_err(|(field, msg)| bad(format!("spec.filters[{i}]{field}"), msg))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut outputs: Vec<OutputConfig> = Vec::new();
    for (i, o) in spec.outputs.iter().enumerate() {
        let at = format!("spec.outputs[{i}]");
        if outputs.iter().any(|x| x.name == o.name) {
            return Err(bad(
                format!("{at}.name"),
                format!("duplicate name {:?}", o.name),
            ));
        }
        let kind = output_kind(o).map_err(|(field, msg)| bad(format!("{at}{field}"), msg))?;
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
        let replace_roots = super::tls_roots::replace_roots(o)
            .map_err(|(field, msg)| bad(format!("{at}{field}"), msg))?;
        outputs.push(OutputConfig {
            name: o.name.clone(),
            kind,
            insecure_http_credentials,
            replace_roots,
        });
    }
    let b = &spec.delivery.batch;
    let batch = BatchConfig {
        max_events: (b.max_events as usize).max(1),
        max_bytes: parse_byte_size(&b.max_bytes)
            .ok_or_else(|| {
                bad(
                    "spec.delivery.batch.maxBytes".into(),
                    format!("bad size {:?}", b.max_bytes),
                )
            })?
            .max(1),
        max_wait: b
            .max_wait
            .to_std()
            .map_err(|e| bad("spec.delivery.batch.maxWait".into(), e.to_string()))?,
    };
    let buf = &spec.delivery.buffer;
    let buffer_bytes = parse_byte_size(&buf.max_size).ok_or_else(|| {
        bad(
            "spec.delivery.buffer.maxSize".into(),
            format!("bad size {:?}", buf.max_size),
        )
    })?;
    if buffer_bytes < batch.max_bytes {
        return Err(bad(
            "spec.delivery.buffer.maxSize".into(),
            "must be at least spec.delivery.batch.maxBytes".into(),
        ));
    }
    Ok(Pipeline {
        key,
        fields: spec.fields.clone(),
        inputs,
        filters,
        outputs,
        batch,
        buffer_bytes,
        disk_buffer: buf.type_ == BufferType::Disk,
        spec,
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

fn output_kind(o: &Output) -> Result<OutputKind, (String, String)> {
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
        for (k, v) in &l.labels {
            crate::agent::record::Template::parse(v)
                .map_err(|e| (format!(".loki.labels.{k}"), e))?;
        }
        return Ok(OutputKind::Loki {
            url: parse_url(&l.url, ".loki.url")?,
            labels: l.labels.clone(),
            tenant_id: l.tenant_id.clone(),
            encoding: l.encoding,
            secret: l.secret_ref.as_ref().map(|r| r.name.clone()),
        });
    }
    if let Some(e) = &o.elasticsearch {
        return Ok(OutputKind::Elasticsearch {
            url: parse_url(&e.url, ".elasticsearch.url")?,
            index: e.index.clone(),
            secret: e.secret_ref.as_ref().map(|r| r.name.clone()),
        });
    }
    if let Some(h) = &o.http {
        return Ok(OutputKind::Http {
            url: parse_url(&h.url, ".http.url")?,
            secret: h.secret_ref.as_ref().map(|r| r.name.clone()),
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

    fn entry(yaml: &str) -> PipelineEntry {
        PipelineEntry {
            namespace: "prod".into(),
            name: "shop".into(),
            spec: serde_yaml::from_str(yaml).unwrap(),
        }
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
        assert_eq!(p.key, "prod/shop");
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
        assert!(err.contains("prod/shop"), "{err}");
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
        let err = serde_yaml::from_str::<LogPipelineSpec>(&loki(", encoding: thrift"))
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
                "apiVersion: outrider.dev/v1alpha1\nkind: LogPipeline\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n{}",
                OK.lines().map(|l| format!("  {l}\n")).collect::<String>()
            )
        };
        std::fs::write(&f, format!("{}---\n{}", doc("a"), doc("b"))).unwrap();
        let ps = load_manifests(&[f]).unwrap();
        let keys: Vec<_> = ps.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["ns/a", "ns/b"]);
    }
}
