-- Argo CD health of an outrider.dev Inventory (argocd-cm key
-- resource.customizations.health.outrider.dev_Inventory), from the status the controller writes:
-- Ready=True/AllReachable is Healthy; Ready=False (HostsUnreachable, SecretNotFound, SecretInvalid,
-- InvalidHosts, HostKeysInvalid, InvalidObject) is Degraded; no status yet, a spec the controller
-- has not observed (status.observedGeneration < metadata.generation) or no probe yet is Progressing.
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
if ready == nil or ready.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = "Waiting for the first probe of the hosts"
  return hs
end
if ready.status == "True" then
  hs.status = "Healthy"
else
  hs.status = "Degraded"
end
hs.message = explain(ready)
return hs
