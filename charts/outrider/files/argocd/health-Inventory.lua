-- Argo CD health of an outrider.dev Inventory (argocd-cm key
-- resource.customizations.health.outrider.dev_Inventory), from the status the controller writes:
-- Ready=True/AllReachable is Healthy; Ready=False (HostsUnreachable, SecretNotFound, SecretInvalid,
-- InvalidHosts, HostKeysInvalid, InvalidObject) is Degraded; no status yet, a spec the controller
-- has not observed (status.observedGeneration < metadata.generation) or no probe yet is Progressing.
-- (after _prelude.lua: hs, condition(), explain(), and the no-status / unobserved-generation
-- cases, which are Progressing)
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
