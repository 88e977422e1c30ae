//! Drift: what a host's kernel says Outrider's ruleset is, reduced to what a person could
//! have changed. `nft -j list table inet outrider` loses handles, counters and metadata and
//! gets its set elements sorted; `iptables-save` keeps only Outrider's chain and whether
//! `INPUT` still jumps to it. The digest of that is recorded right after an apply and
//! compared on every drift check.

use serde_json::Value;

use super::IPT_CHAIN;

/// Why a read-back could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error("nft -j output is not JSON: {0}")]
    Json(String),
    #[error("nft -j output has no nftables array")]
    Shape,
}

/// The canonical form of `nft -j list table …` output.
pub fn normalise_nft(json: &str) -> Result<String, DriftError> {
    let value: Value = serde_json::from_str(json).map_err(|e| DriftError::Json(e.to_string()))?;
    let items = value
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or(DriftError::Shape)?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        if item.get("metainfo").is_some() {
            continue;
        }
        let mut item = item.clone();
        scrub(&mut item);
        out.push(item);
    }
    let mut text = String::new();
    for item in &out {
        canonical(item, &mut text);
        text.push('\n');
    }
    Ok(text)
}

/// Drops handles, zeroes counters, sorts set elements, recursively.
fn scrub(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.remove("handle");
            if let Some(counter) = map.get_mut("counter")
                && counter.is_object()
            {
                *counter = Value::Null;
            }
            for (key, child) in map.iter_mut() {
                scrub(child);
                if key == "elem"
                    && let Value::Array(elems) = child
                {
                    elems.sort_by_cached_key(|e| e.to_string());
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(scrub),
        _ => {}
    }
}

/// JSON with object keys sorted, whatever serde_json's map order is.
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The canonical form of `iptables-save -t filter` output for Outrider's chain: its rules
/// in order (counters dropped) and the jumps from `INPUT` to it.
pub fn normalise_iptables(save: &str) -> String {
    let own = format!("-A {IPT_CHAIN} ");
    let mut out = String::new();
    for line in save.lines() {
        let line = line.trim();
        // "[pkts:bytes] -A ..." with -c
        let line = match line.strip_prefix('[') {
            Some(rest) => rest.split_once("] ").map(|(_, l)| l).unwrap_or(line),
            None => line,
        };
        if line.starts_with(&own)
            || (line.starts_with("-A INPUT ") && line.ends_with(&format!("-j {IPT_CHAIN}")))
        {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTED: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "outrider", "handle": 7, "comment": "outrider prod/web g1 0123"}}, {"set": {"family": "inet", "name": "zone_trust_v4", "table": "outrider", "type": "ipv4_addr", "handle": 2, "flags": ["interval"], "elem": [{"prefix": {"addr": "192.168.0.0", "len": 16}}, {"prefix": {"addr": "10.0.0.0", "len": 8}}]}}, {"rule": {"family": "inet", "table": "outrider", "chain": "input", "handle": 9, "comment": "x", "expr": [{"counter": {"packets": 12, "bytes": 900}}, {"accept": null}]}}]}"#;

    #[test]
    fn handles_counters_and_element_order_do_not_count_as_drift() {
        let a = normalise_nft(LISTED).unwrap();
        let b = LISTED
            .replace("\"handle\": 9", "\"handle\": 44")
            .replace("\"packets\": 12, \"bytes\": 900", "\"packets\": 0, \"bytes\": 0")
            .replace(
                r#"[{"prefix": {"addr": "192.168.0.0", "len": 16}}, {"prefix": {"addr": "10.0.0.0", "len": 8}}]"#,
                r#"[{"prefix": {"addr": "10.0.0.0", "len": 8}}, {"prefix": {"addr": "192.168.0.0", "len": 16}}]"#,
            )
            .replace("1.0.6", "1.0.9");
        assert_ne!(b, LISTED);
        assert_eq!(normalise_nft(&b).unwrap(), a);
        assert!(!a.contains("metainfo") && !a.contains("handle"), "{a}");
    }

    #[test]
    fn a_changed_element_or_verdict_is_drift() {
        let a = normalise_nft(LISTED).unwrap();
        let element = LISTED.replace("\"len\": 16", "\"len\": 15");
        let verdict = LISTED.replace("{\"accept\": null}", "{\"drop\": null}");
        assert_ne!(normalise_nft(&element).unwrap(), a);
        assert_ne!(normalise_nft(&verdict).unwrap(), a);
        assert!(normalise_nft("not json").is_err());
        assert!(normalise_nft("{}").is_err());
    }

    #[test]
    fn iptables_keeps_only_outriders_chain_and_its_jump() {
        let save = "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [10:20]\n:OUTRIDER-INPUT - [0:0]\n[5:300] -A INPUT -j OUTRIDER-INPUT\n-A INPUT -p tcp -j ACCEPT\n[1:2] -A OUTRIDER-INPUT -p tcp --dport 22 -j RETURN\nCOMMIT\n";
        assert_eq!(
            normalise_iptables(save),
            "-A INPUT -j OUTRIDER-INPUT\n-A OUTRIDER-INPUT -p tcp --dport 22 -j RETURN\n"
        );
    }
}
