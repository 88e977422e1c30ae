-- Argo CD health of an outrider.dev LogPipeline (argocd-cm key
-- resource.customizations.health.outrider.dev_LogPipeline): whether the node agents ship with
-- the pipeline's current configuration.
--   Ready=True (AllNodesShipping) -> Healthy; Ready=False/RollingOut (agents still loading the
--   new configuration), no status yet, or a spec the controller has not observed
--   (status.observedGeneration < metadata.generation) -> Progressing; Ready=False for any other
--   reason (InvalidSpec, SecretNotFound: left out of the agent config; NoAgents: no agent runs on
--   a selected node) or Degraded=True (an output failing) -> Degraded.
-- (after _prelude.lua: hs, condition(), explain(), and the no-status / unobserved-generation
-- cases, which are Progressing)
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
