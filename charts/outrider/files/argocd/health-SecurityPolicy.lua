-- Argo CD health of an outrider.dev SecurityPolicy (argocd-cm key
-- resource.customizations.health.outrider.dev_SecurityPolicy): whether every target host runs
-- the rendered ruleset.
--   Progressing=True (RollingOut), no status yet, or a spec the controller has not observed
--   (status.observedGeneration < metadata.generation) -> Progressing;
--   hosts drifted, failed or rolled back (status.hosts.drifted/failed/rolledBack > 0), or
--   Ready=False for any other reason (RolloutHalted, InvalidPolicy, InvalidSpec,
--   InventoryNotFound, SecretNotFound, ...) -> Degraded;
--   Ready=True (Applied, NoHosts) -> Healthy.
local hs = {}
local function condition(t)
  if obj.status ~= nil and obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == t then return c end
    end
  end
  return nil
end
local function explain(c)
  if c.message ~= nil and c.message ~= "" then return c.reason .. ": " .. c.message end
  return c.reason or ""
end
if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Outrider controller to report status"
  return hs
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Outrider controller to observe generation " .. generation
  return hs
end
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
