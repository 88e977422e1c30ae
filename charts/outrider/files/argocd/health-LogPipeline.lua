-- Argo CD health of an outrider.dev LogPipeline (argocd-cm key
-- resource.customizations.health.outrider.dev_LogPipeline): whether the node agents ship with
-- the pipeline's current configuration.
--   Ready=True (AllNodesShipping) -> Healthy; Ready=False/RollingOut (agents still loading the
--   new configuration), no status yet, or a spec the controller has not observed
--   (status.observedGeneration < metadata.generation) -> Progressing; Ready=False for any other
--   reason (InvalidSpec, SecretNotFound: left out of the agent config; NoAgents: no agent runs on
--   a selected node) or Degraded=True (an output failing) -> Degraded.
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
local degraded = condition("Degraded")
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = explain(degraded)
  return hs
end
local ready = condition("Ready")
if ready == nil or ready.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = "Waiting for the agent configuration to be rendered"
  return hs
end
if ready.status == "True" then
  hs.status = "Healthy"
elseif ready.reason == "RollingOut" then
  hs.status = "Progressing"
else
  hs.status = "Degraded"
end
hs.message = explain(ready)
return hs
