-- Argo CD health of an outrider.dev SecurityPolicy (argocd-cm key
-- resource.customizations.health.outrider.dev_SecurityPolicy): whether every target host runs
-- the rendered ruleset.
--   Progressing=True (RollingOut), no status yet, or a spec the controller has not observed
--   (status.observedGeneration < metadata.generation) -> Progressing;
--   hosts drifted, failed or rolled back (status.hosts.drifted/failed/rolledBack > 0), or
--   Ready=False for any other reason (RolloutHalted, InvalidPolicy, InvalidSpec,
--   InventoryNotFound, SecretNotFound, ...) -> Degraded;
--   Ready=True (Applied, NoHosts) -> Healthy.
-- (after _prelude.lua: hs, condition(), explain(), and the no-status / unobserved-generation
-- cases, which are Progressing)
local ready = condition("Ready")
local progressing = condition("Progressing")
if progressing ~= nil and progressing.status == "True" then
  hs.status = "Progressing"
  hs.message = explain(progressing)
  return hs
end
local h = obj.status.hosts or {}
local drifted = h.drifted or 0
local failed = h.failed or 0
local rolledBack = h.rolledBack or 0
if drifted + failed + rolledBack > 0 then
  hs.status = "Degraded"
  if ready ~= nil and ready.status == "False" then
    hs.message = explain(ready)
  else
    hs.message = drifted .. " drifted, " .. failed .. " failed (" .. rolledBack .. " rolled back) of " .. (h.total or 0) .. " hosts"
  end
  return hs
end
if ready == nil or ready.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = "Waiting for the first rollout"
  return hs
end
if ready.status == "True" then
  hs.status = "Healthy"
else
  hs.status = "Degraded"
end
hs.message = explain(ready)
return hs
