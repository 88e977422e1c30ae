-- Argo CD health of an outrider.dev DeploymentPlan (argocd-cm key
-- resource.customizations.health.outrider.dev_DeploymentPlan), from status.phase and the
-- conditions of the run the controller reports:
--   Succeeded -> Healthy; Failed, RolledBack -> Degraded; Paused -> Suspended (spec.paused on a
--   run that has not finished; pausing a finished plan changes nothing, it stays as it ended);
--   Running -> Progressing (also while rolling back); Pending -> Degraded with the reason the
--   run cannot start (InventoryNotFound, SecretNotFound, SecretInvalid, NoTargets, InvalidSpec,
--   ProgressUnreadable: the controller retries, the user has to act), Progressing without one.
-- No status yet, or a spec the controller has not observed yet (status.observedGeneration <
-- metadata.generation: a new run is about to start), is Progressing.
-- (after _prelude.lua: hs, condition(), explain(), and the no-status / unobserved-generation
-- cases, which are Progressing)
local function hosts()
  local h = obj.status.hosts
  if h == nil then return "" end
  return (h.succeeded or 0) .. " of " .. (h.total or 0) .. " hosts succeeded, " .. (h.failed or 0) .. " failed"
end
local phase = obj.status.phase
local ready = condition("Ready")
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded: " .. hosts()
elseif phase == "Failed" or phase == "RolledBack" then
  hs.status = "Degraded"
  local msg = phase .. ": " .. hosts()
  local failures = obj.status.failures
  if failures ~= nil and failures[1] ~= nil then
    local f = failures[1]
    msg = msg .. "; first failure: host " .. (f.host or "?") .. " stage " .. (f.stage or "?") .. " " .. (f.reason or "")
    if f.exitCode ~= nil then msg = msg .. " (exit code " .. f.exitCode .. ")" end
  end
  hs.message = msg
elseif phase == "Paused" then
  hs.status = "Suspended"
  hs.message = "Paused (spec.paused): " .. hosts()
elseif phase == "Running" then
  hs.status = "Progressing"
  local progressing = condition("Progressing")
  local msg = "Running"
  if progressing ~= nil and progressing.reason == "RollingBack" then msg = "Rolling back" end
  local b = obj.status.batch
  if b ~= nil and b.total ~= nil and b.total > 0 then
    msg = msg .. ", batch " .. (b.current or 0) .. " of " .. b.total
  end
  hs.message = msg .. ": " .. hosts()
elseif ready ~= nil and ready.status == "False" then
  -- Pending (or no phase, e.g. InvalidObject): the run cannot start
  hs.status = "Degraded"
  hs.message = explain(ready)
else
  hs.status = "Progressing"
  hs.message = "Waiting for the run to start"
end
return hs
