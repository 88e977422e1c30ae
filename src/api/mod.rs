//! The custom resources of `outrider.dev/v1alpha1`: types and schema validation only, no I/O.

// `#[kube(printcolumn(.., type_ = "integer", ..), printcolumn(.., type_ = "integer", ..))]`
// repeats argument values on purpose; clippy mistakes them for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

pub mod cluster_log_pipeline;
pub mod common;
pub mod deployment_plan;
pub mod health_check;
pub mod inventory;
pub mod log_pipeline;
pub mod output_tls;
pub mod security_policy;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

pub use cluster_log_pipeline::{ClusterLogPipeline, ClusterLogPipelineSpec};
pub use deployment_plan::{DeploymentPlan, DeploymentPlanSpec, DeploymentPlanStatus};
pub use health_check::{HealthCheck, HealthCheckSpec, HealthCheckStatus};
pub use inventory::{Inventory, InventorySpec, InventoryStatus};
pub use log_pipeline::{LogPipeline, LogPipelineSpec, LogPipelineStatus};
pub use security_policy::{SecurityPolicy, SecurityPolicySpec, SecurityPolicyStatus};

/// API group of every Outrider kind.
pub const GROUP: &str = "outrider.dev";
/// Field manager for every write the operator makes (server-side apply).
pub const FIELD_MANAGER: &str = "outrider";

/// Every CRD, in the order `outrider crd` prints them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![
        Inventory::crd(),
        DeploymentPlan::crd(),
        HealthCheck::crd(),
        SecurityPolicy::crd(),
        LogPipeline::crd(),
        ClusterLogPipeline::crd(),
    ];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            if let Some(schema) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                normalize_schema(schema);
            }
        }
    }
    crds
}

/// Makes the generated schema what the API server and `kubectl explain` expect:
///
/// - schemars describes Rust's unsigned integers with formats (`uint16`, `uint32`...) that
///   the API server does not know and warns about on every CRD apply; they become the
///   bounds they stand for, so a negative count is still rejected;
/// - doc comments are hard-wrapped at 100 columns; `kubectl explain` wraps by itself, so
///   single line breaks become spaces (blank lines still separate paragraphs).
fn normalize_schema(schema: &mut JSONSchemaProps) {
    if let Some(description) = schema.description.as_mut() {
        *description = description
            .split("\n\n")
            .map(|paragraph| {
                paragraph
                    .split('\n')
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join("\n\n");
    }
    let max = match schema.format.as_deref() {
        Some("uint8") => Some(f64::from(u8::MAX)),
        Some("uint16") => Some(f64::from(u16::MAX)),
        Some("uint32") => Some(f64::from(u32::MAX)),
        Some("uint64" | "uint") => Some(i64::MAX as f64),
        _ => None,
    };
    if let Some(max) = max {
        schema.format = None;
        schema.minimum.get_or_insert(0.0);
        schema.maximum.get_or_insert(max);
    }
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        normalize_schema(child);
    }
    match schema.items.as_mut() {
        Some(JSONSchemaPropsOrArray::Schema(item)) => normalize_schema(item),
        Some(JSONSchemaPropsOrArray::Schemas(items)) => items.iter_mut().for_each(normalize_schema),
        None => {}
    }
    if let Some(JSONSchemaPropsOrBool::Schema(values)) = schema.additional_properties.as_mut() {
        normalize_schema(values);
    }
}

/// The CRDs as multi-document YAML, exactly what `crds/` holds.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod cel_tests;
#[cfg(test)]
mod tests;
