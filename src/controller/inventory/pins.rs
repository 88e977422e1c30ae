//! The ConfigMap that holds an Inventory's pinned host keys: read by every kind that builds
//! a Fleet from the Inventory, extended (never rewritten) by whoever trusts a new key on
//! first use — the Inventory's probes and DeploymentPlan runs alike — with a JSON merge
//! patch, so two writers adding different hosts never lose each other's pins.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};

use super::super::{At, Context, Error, Stage};
use crate::api::FIELD_MANAGER;
use crate::api::inventory::Inventory;
use crate::resolve::ResolveError;
use crate::resolve::inventory::{pins_configmap_name, pins_from_data};
use crate::ssh::{Pin, Pins};

/// The pins of `inv` (none when its ConfigMap does not exist yet). `Ok(Err(_))` when the
/// ConfigMap holds something unreadable (a user-side problem, reported as a condition).
pub async fn read(ctx: &Context, inv: &Inventory) -> Result<Result<Pins, ResolveError>, Error> {
    let ns = inv.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<ConfigMap> = ctx.api_in(&ns);
    let cm = api
        .get_opt(&pins_configmap_name(&inv.name_any()))
        .await
        .at(Stage::Resolve)?;
    Ok(pins_from_data(
        inv,
        cm.as_ref().and_then(|c| c.data.as_ref()),
    ))
}

/// Adds `new` pins to `inv`'s ConfigMap, creating it (owned by the Inventory) if needed.
pub async fn record(ctx: &Context, inv: &Inventory, new: &[Pin]) -> Result<(), Error> {
    if new.is_empty() {
        return Ok(());
    }
    let ns = inv.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<ConfigMap> = ctx.api_in(&ns);
    let name = pins_configmap_name(&inv.name_any());
    let data: BTreeMap<String, String> = new.iter().map(Pins::entry).collect();
    let patch = serde_json::json!({ "data": data });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    for _ in 0..3 {
        match api.patch(&name, &params, &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(ns.clone()),
                        owner_references: inv.controller_owner_ref(&()).map(|o| vec![o]),
                        labels: Some(BTreeMap::from([
                            ("app.kubernetes.io/managed-by".into(), "outrider".into()),
                            ("outrider.dev/inventory".into(), inv.name_any()),
                        ])),
                        ..Default::default()
                    },
                    data: Some(data.clone()),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &cm).await {
                    Ok(_) => return Ok(()),
                    // another writer created it first: merge into theirs
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    Err(e) => return Err(e).at(Stage::Apply),
                }
            }
            Err(e) => return Err(e).at(Stage::Apply),
        }
    }
    api.patch(&name, &params, &Patch::Merge(&patch))
        .await
        .at(Stage::Apply)?;
    Ok(())
}
