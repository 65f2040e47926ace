-- Argo CD health of a wallaby.dev Flow. Register it in argocd-cm under
-- `resource.customizations.health.wallaby.dev_Flow` (docs/kubernetes.md).
-- Order matters: a suspended flow is Suspended whatever else holds; a failure beats
-- progress; a spec the operator has not observed yet is Progressing even if Ready.
local hs = { status = "Progressing", message = "Waiting for the operator to report status" }

local function condition(status, kind)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "Flow is suspended (spec.suspend): the worker is stopped, the slot is kept"
  return hs
end

local status = obj.status
if status == nil then
  return hs
end

local degraded = condition(status, "Degraded")
if status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(condition(status, "Ready"), "Flow failed")
  return hs
end
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded, "Flow is degraded")
  return hs
end

local generation = obj.metadata ~= nil and obj.metadata.generation or nil
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "The operator has not reconciled generation " .. tostring(generation) .. " yet"
  return hs
end

local progressing = condition(status, "Progressing")
if progressing ~= nil and progressing.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(progressing, "Flow is progressing")
  return hs
end

local ready = condition(status, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready, "Flow is ready")
  return hs
end

-- Not ready and nothing in progress (e.g. an invalid spec waiting for an edit).
if ready ~= nil and ready.status == "False" and progressing ~= nil and progressing.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(ready, "Flow is not ready")
  return hs
end

hs.message = describe(ready, hs.message)
return hs
