-- Argo CD health of an outrider.dev HealthCheck (argocd-cm key
-- resource.customizations.health.outrider.dev_HealthCheck): the probed targets' health.
--   Ready=False (InvalidSpec, InventoryNotFound, SecretNotFound, ...: the probes cannot run),
--   Degraded=True (TargetsUnhealthy: a target failed failureThreshold times; TargetsUnknown: a
--   target could not be probed) -> Degraded; targets still undecided (status.summary.unknown > 0
--   while Degraded=False), no round of probes yet, no status yet, or a spec the controller has
--   not observed (status.observedGeneration < metadata.generation) -> Progressing; else Healthy
--   (anomalous targets and an open maintenance window are named in the message).
-- (after _prelude.lua: hs, condition(), explain(), and the no-status / unobserved-generation
-- cases, which are Progressing)
local ready = condition("Ready")
if ready ~= nil and ready.status == "False" then
  hs.status = "Degraded"
  hs.message = explain(ready)
  return hs
end
local degraded = condition("Degraded")
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = explain(degraded)
  return hs
end
local s = obj.status.summary
if ready == nil or obj.status.lastRunAt == nil or s == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the first round of probes"
  return hs
end
local maintenance = ""
if obj.status.inMaintenance then maintenance = " (in maintenance)" end
if (s.unknown or 0) > 0 then
  hs.status = "Progressing"
  hs.message = (s.unknown or 0) .. " targets not decided yet, " .. (s.healthy or 0) .. " healthy" .. maintenance
  return hs
end
hs.status = "Healthy"
local msg = (s.healthy or 0) .. " targets healthy"
if (s.anomalous or 0) > 0 then msg = msg .. ", " .. s.anomalous .. " anomalous (far from their baseline)" end
hs.message = msg .. maintenance
return hs
