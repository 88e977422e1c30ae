-- Shared start of every Outrider health check (the chart prepends it to each kind's script in
-- templates/argocd-health.yaml; Argo CD has no shared Lua modules): the result table, a
-- condition lookup, a reason: message formatter, and the two Progressing cases every kind shares:
-- no status yet, and a spec the controller has not observed yet.
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
