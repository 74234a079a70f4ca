"""The Redis store's layout and its atomic units: which key holds what (``LAYOUT``,
``Keys``) and the Lua scripts that change several keys at once (create, commit, lease,
report, ...). ``bach.backends.redis`` runs them; see its docstring for the design.
"""

from __future__ import annotations

from typing import Any

STATUSES = ("PENDING", "RUNNING", "COMPLETE", "FAILED", "CANCELLED")
TERMINAL = ("COMPLETE", "FAILED", "CANCELLED")

#: Every key and channel, as ``name: (suffix, takes an argument)``.
LAYOUT: dict[str, tuple[str, bool]] = {
    "req": ("req", True),
    "parts": ("parts", True),
    "pver": ("pver", True),
    "keys": ("keys", False),
    "plans": ("plans", False),
    "created": ("created", False),
    "status": ("status", True),
    "ended": ("ended", False),
    "job": ("job", True),
    "queue": ("queue", True),
    "running": ("running", True),
    "services": ("services", False),
    "counts": ("counts", False),
    "leases": ("leases", False),
    "held": ("held", True),
    "workers": ("workers", False),
    "rjobs": ("rjobs", True),
    "reports": ("reports", False),
    "outbox": ("outbox", False),
    "seq": ("seq", False),
    "totals": ("totals", False),
    "supervisors": ("supervisors", False),
    "present": ("present", False),
    "bell_jobs": ("bell:jobs", True),
    "bell_reports": ("bell:reports", False),
    "bell_ended": ("bell:ended", False),
}

REQUEST_FIELDS = (
    "id", "key", "status", "version", "plan_id", "body", "created_at", "updated_at", "to_run"
)  # fmt: skip
JOB_FIELDS = (
    "id",
    "request_id",
    "task",
    "attempt",
    "service",
    "payload",
    "available_at",
    "timeout",
)


class Keys:
    """Key names for one prefix (Python side of ``LAYOUT``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __getattr__(self, name: str) -> Any:
        suffix, takes_arg = LAYOUT[name]
        base = f"{self.prefix}:{suffix}"
        if takes_arg:
            return lambda arg: f"{base}:{arg}"
        return base


def _lua_prelude() -> str:
    """The same layout as Lua functions: ``K.req(id)``, ``K.keys``; the prefix is ARGV[1]."""
    lines = ["local P = ARGV[1]", "local K = {}"]
    for name, (suffix, takes_arg) in LAYOUT.items():
        if takes_arg:
            lines.append(f"K.{name} = function(a) return P .. ':{suffix}:' .. a end")
        else:
            lines.append(f"K.{name} = P .. ':{suffix}'")
    return "\n".join(lines) + "\n"


# Shared Lua pieces. Arguments arrive flat in ARGV; ``arg()`` reads the next one.
_LUA_COMMON = (
    _lua_prelude()
    + """
local pos = 1
local function arg() pos = pos + 1; return ARGV[pos] end
local rung = {}
local function ring(channel) rung[channel] = true end
local function ring_all() for channel in pairs(rung) do redis.call('PUBLISH', channel, '') end end

-- job fields: id request_id task attempt service payload available_at timeout
local function enqueue(f)
  local jk = K.job(f[1])
  if redis.call('EXISTS', jk) == 1 then return end
  redis.call('HSET', jk, 'id', f[1], 'request_id', f[2], 'task', f[3], 'attempt', f[4],
    'service', f[5], 'payload', f[6], 'available_at', f[7], 'timeout', f[8],
    'worker', '', 'until', '0', 'deliveries', '0', 'lost', '[]')
  redis.call('ZADD', K.queue(f[5]), f[7], f[1])
  redis.call('SADD', K.services, f[5])
  redis.call('HINCRBY', K.counts, f[5] .. ':enqueued', 1)
  redis.call('SADD', K.rjobs(f[2]), f[1])
  ring(K.bell_jobs(f[5]))
end

local function read_jobs()
  local n = tonumber(arg())
  for _ = 1, n do
    local f = {}
    for i = 1, 8 do f[i] = arg() end
    enqueue(f)
  end
end

local function unhold(id, worker)
  if worker and worker ~= '' then
    redis.call('SREM', K.held(worker), id)
    if redis.call('SCARD', K.held(worker)) == 0 then redis.call('SREM', K.workers, worker) end
  end
end

-- put a leased job back on its queue; uncount: the delivery does not count; else the
-- delivery was lost, for this reason, at this time: the job keeps a note of it
local function requeue(id, uncount, reason, now)
  local jk = K.job(id)
  local f = redis.call('HMGET', jk, 'service', 'worker', 'available_at', 'lost')
  if not f[1] or f[2] == '' then return 0 end
  redis.call('ZREM', K.leases, id)
  redis.call('SREM', K.running(f[1]), id)
  unhold(id, f[2])
  redis.call('HSET', jk, 'worker', '', 'until', '0')
  if uncount then
    redis.call('HINCRBY', jk, 'deliveries', -1)
  else
    local entry = cjson.encode({worker = f[2], reason = reason, at = tonumber(now)})
    local lost = f[4]
    if not lost or lost == '' or lost == '[]' then
      lost = '[' .. entry .. ']'
    else
      lost = string.sub(lost, 1, -2) .. ',' .. entry .. ']'
    end
    redis.call('HSET', jk, 'lost', lost)
  end
  redis.call('ZADD', K.queue(f[1]), f[3], id)
  ring(K.bell_jobs(f[1]))
  return 1
end

-- a report acks its job (wherever it is) and joins the completion channel once
local function take_report(id, ok, report)
  local jk = K.job(id)
  local f = redis.call('HMGET', jk, 'service', 'worker', 'request_id')
  if f[1] then
    redis.call('HINCRBY', K.counts, f[1] .. (ok == '1' and ':completed' or ':failed'), 1)
    redis.call('ZREM', K.queue(f[1]), id)
    redis.call('SREM', K.running(f[1]), id)
    redis.call('ZREM', K.leases, id)
    unhold(id, f[2])
    redis.call('SREM', K.rjobs(f[3]), id)
    redis.call('DEL', jk)
  end
  if redis.call('HSETNX', K.reports, id, report) == 1 then
    redis.call('ZADD', K.outbox, redis.call('INCR', K.seq), id)
    ring(K.bell_reports)
  end
end

local function read_reports()
  local n = tonumber(arg())
  for _ = 1, n do
    local id = arg()
    local ok = arg()
    take_report(id, ok, arg())
  end
end

local REQUEST_FIELDS = {'id', 'key', 'status', 'version', 'plan_id', 'body',
  'created_at', 'updated_at', 'to_run'}

-- a command with a long list of arguments, in slices (Lua's unpack has a limit)
local function call_slices(command, key, list)
  for i = 1, #list, 4000 do
    redis.call(command, key, unpack(list, i, math.min(i + 3999, #list)))
  end
end

-- n_parts [name text]...: a request's parts as {fields for HSET, scores for ZADD}
local function read_parts(version)
  local fields, scores = {}, {}
  for _ = 1, tonumber(arg()) do
    local name, text = arg(), arg()
    fields[#fields + 1] = name
    fields[#fields + 1] = text
    scores[#scores + 1] = version
    scores[#scores + 1] = name
  end
  return {fields, scores}
end

local function write_parts(rid, parts)
  if #parts[1] == 0 then return end
  call_slices('HSET', K.parts(rid), parts[1])
  call_slices('ZADD', K.pver(rid), parts[2])
end

-- the parts written after version since (all of them when since < 0), flat
local function parts_since(rid, since)
  if tonumber(since) < 0 then return redis.call('HGETALL', K.parts(rid)) end
  local names = redis.call('ZRANGEBYSCORE', K.pver(rid), '(' .. since, '+inf')
  local out = {}
  for i = 1, #names, 4000 do
    local slice = {unpack(names, i, math.min(i + 3999, #names))}
    local texts = redis.call('HMGET', K.parts(rid), unpack(slice))
    for j, name in ipairs(slice) do
      out[#out + 1] = name
      out[#out + 1] = texts[j]
    end
  end
  return out
end
local TERMINAL = {COMPLETE = true, FAILED = true, CANCELLED = true}

local function write_request(f, old_status)
  local rk = K.req(f[1])
  local change = tonumber(f[9]) - tonumber(redis.call('HGET', rk, 'to_run') or '0')
  if change ~= 0 then redis.call('HINCRBY', K.totals, 'to_run', change) end
  local pairs_ = {}
  for i, name in ipairs(REQUEST_FIELDS) do
    pairs_[#pairs_ + 1] = name
    pairs_[#pairs_ + 1] = f[i]
  end
  redis.call('HSET', rk, unpack(pairs_))
  if old_status ~= f[3] then
    if old_status then redis.call('ZREM', K.status(old_status), f[1]) end
    redis.call('ZADD', K.status(f[3]), f[7], f[1])
  end
  if TERMINAL[f[3]] then
    redis.call('ZADD', K.ended, f[8], f[1])
    if not TERMINAL[old_status or ''] then redis.call('PUBLISH', K.bell_ended, f[1]) end
  end
end
"""
)

_CREATE = (
    _LUA_COMMON
    + """
local f = {}
for i = 1, 9 do f[i] = arg() end
local existing = redis.call('HGET', K.keys, f[2])
if existing then
  return {0, redis.call('HMGET', K.req(existing), unpack(REQUEST_FIELDS)),
    parts_since(existing, -1)}
end
local parts = read_parts(f[4])
local plan_id, plan = arg(), arg()
redis.call('HSETNX', K.plans, plan_id, plan)
redis.call('HSET', K.keys, f[2], f[1])
redis.call('ZADD', K.created, f[7], f[1])
write_request(f, nil)
write_parts(f[1], parts)
read_jobs()
ring_all()
return {1}
"""
)

# Per transition: request_id expected_version has_record [9 record fields
#   n_parts [name text]...] n_jobs [8 fields each] n_consumed [ids] withdraw
_COMMIT = (
    _LUA_COMMON
    + """
local count = tonumber(arg())
local results = {}
for t = 1, count do
  local rid, expected, has_record = arg(), arg(), arg()
  local rec, parts = nil, nil
  if has_record == '1' then
    rec = {}
    for i = 1, 9 do rec[i] = arg() end
    parts = read_parts(rec[4])
  end
  local jobs = {}
  for j = 1, tonumber(arg()) do
    local f = {}
    for i = 1, 8 do f[i] = arg() end
    jobs[j] = f
  end
  local consumed = {}
  for c = 1, tonumber(arg()) do consumed[c] = arg() end
  local withdraw = arg() == '1'

  local ok = true
  local old_status = nil
  if rec then
    local cur = redis.call('HMGET', K.req(rid), 'version', 'status')
    ok = cur[1] == expected
    old_status = cur[2]
  end
  if ok then
    if rec then
      write_request(rec, old_status)
      write_parts(rid, parts)
    end
    for _, id in ipairs(consumed) do
      redis.call('HDEL', K.reports, id)
      redis.call('ZREM', K.outbox, id)
    end
    if withdraw then  -- queued and leased: a holder learns at its next extend
      for _, id in ipairs(redis.call('SMEMBERS', K.rjobs(rid))) do
        local jf = redis.call('HMGET', K.job(id), 'service', 'worker')
        if jf[1] then
          redis.call('ZREM', K.queue(jf[1]), id)
          redis.call('SREM', K.running(jf[1]), id)
          redis.call('ZREM', K.leases, id)
          unhold(id, jf[2])
          redis.call('DEL', K.job(id))
        end
        redis.call('SREM', K.rjobs(rid), id)
      end
    end
    for _, f in ipairs(jobs) do enqueue(f) end
  end
  results[t] = ok and 1 or 0
end
ring_all()
return results
"""
)

# ARGV: prefix service worker now until limit n_reports [id report]...
_LEASE = (
    _LUA_COMMON
    + """
local service, worker, now, until_, limit = arg(), arg(), arg(), arg(), tonumber(arg())
read_reports()
local out = {}
if limit > 0 then
  local ids = redis.call('ZRANGEBYSCORE', K.queue(service), '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local jk = K.job(id)
    redis.call('ZREM', K.queue(service), id)
    local deliveries = redis.call('HINCRBY', jk, 'deliveries', 1)
    redis.call('HSET', jk, 'worker', worker, 'until', until_)
    redis.call('ZADD', K.leases, until_, id)
    redis.call('SADD', K.running(service), id)
    redis.call('SADD', K.held(worker), id)
    local f = redis.call('HMGET', jk, 'id', 'request_id', 'task', 'attempt', 'service',
      'payload', 'available_at', 'timeout', 'lost')
    f[10] = f[9] or '[]'
    f[9] = deliveries
    out[#out + 1] = f
  end
  if #ids > 0 then redis.call('SADD', K.workers, worker) end
end
ring_all()
return out
"""
)

_REPORT = _LUA_COMMON + "read_reports()\nring_all()\nreturn 1\n"

# ARGV: prefix worker until ids...
_EXTEND = (
    _LUA_COMMON
    + """
local worker, until_ = arg(), arg()
local lost = {}
for i = pos + 1, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', K.job(id), 'worker') == worker then
    redis.call('HSET', K.job(id), 'until', until_)
    redis.call('ZADD', K.leases, until_, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
"""
)

# ARGV: prefix worker ids...
_RELEASE = (
    _LUA_COMMON
    + """
local worker = arg()
local n = 0
for i = pos + 1, #ARGV do
  if redis.call('HGET', K.job(ARGV[i]), 'worker') == worker then
    n = n + requeue(ARGV[i], true, nil, nil)
  end
end
ring_all()
return n
"""
)

# ARGV: prefix worker now
_RELEASE_WORKER = (
    _LUA_COMMON
    + """
local n = 0
local worker, now = arg(), arg()
for _, id in ipairs(redis.call('SMEMBERS', K.held(worker))) do
  n = n + requeue(id, false, 'worker died', now)
end
ring_all()
return n
"""
)

# ARGV: prefix now
_REQUEUE_EXPIRED = (
    _LUA_COMMON
    + """
local n = 0
local now = arg()
for _, id in ipairs(redis.call('ZRANGEBYSCORE', K.leases, '-inf', '(' .. now)) do
  n = n + requeue(id, false, 'lease expired', now)
end
ring_all()
return n
"""
)

# ARGV: prefix ref
_LOAD = (
    _LUA_COMMON
    + """
local ref = arg()
local id = ref
if redis.call('EXISTS', K.req(ref)) == 0 then
  id = redis.call('HGET', K.keys, ref)
  if not id then return nil end
end
return {redis.call('HMGET', K.req(id), unpack(REQUEST_FIELDS)), parts_since(id, -1)}
"""
)

# ARGV: prefix [request_id since]... -> {{request fields}, {name text...}}...
_LOAD_MANY = (
    _LUA_COMMON
    + """
local out = {}
for i = 2, #ARGV, 2 do
  local fields = redis.call('HMGET', K.req(ARGV[i]), unpack(REQUEST_FIELDS))
  if fields[1] then out[#out + 1] = {fields, parts_since(ARGV[i], ARGV[i + 1])} end
end
return out
"""
)

# ARGV: prefix limit with_requests -> {reports, {request fields}...}
_REPORTS = (
    _LUA_COMMON
    + """
local limit, with_requests = tonumber(arg()), arg() == '1'
local ids = redis.call('ZRANGE', K.outbox, 0, limit - 1)
if #ids == 0 then return {{}} end
local reports = redis.call('HMGET', K.reports, unpack(ids))
local out = {reports}
if with_requests then
  local seen = {}
  for _, report in ipairs(reports) do
    if report then
      local rid = cjson.decode(report)[2]
      if not seen[rid] then
        seen[rid] = true
        local fields = redis.call('HMGET', K.req(rid), unpack(REQUEST_FIELDS))
        if fields[1] then out[#out + 1] = fields end
      end
    end
  end
end
return out
"""
)

# ARGV: prefix request_id
_LEASED = (
    _LUA_COMMON
    + """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', K.rjobs(arg()))) do
  local f = redis.call('HMGET', K.job(id), 'task', 'worker')
  if f[2] and f[2] ~= '' then
    out[#out + 1] = f[1]
    out[#out + 1] = f[2]
  end
end
return out
"""
)

# ARGV: prefix now
_STATS = (
    _LUA_COMMON
    + """
local now = arg()
local requests = {}
for _, status in ipairs({'PENDING', 'RUNNING', 'COMPLETE', 'FAILED', 'CANCELLED'}) do
  requests[#requests + 1] = status
  requests[#requests + 1] = redis.call('ZCARD', K.status(status))
end
local queues = {}
for _, service in ipairs(redis.call('SMEMBERS', K.services)) do
  local q = K.queue(service)
  local oldest = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
  queues[#queues + 1] = {service, redis.call('ZCOUNT', q, '-inf', now),
    redis.call('ZCOUNT', q, '(' .. now, '+inf'), redis.call('SCARD', K.running(service)),
    oldest[2] or '', redis.call('HMGET', K.counts, service .. ':enqueued',
    service .. ':completed', service .. ':failed')}
end
local workers = {}
for _, worker in ipairs(redis.call('SMEMBERS', K.workers)) do
  workers[#workers + 1] = worker
  workers[#workers + 1] = redis.call('SCARD', K.held(worker))
end
return {requests, queues, workers, redis.call('ZCARD', K.outbox),
  redis.call('HGET', K.totals, 'to_run') or '0'}
"""
)

# ARGV: prefix before limit
_ANNOUNCE = (
    _LUA_COMMON
    + """
local me, entry, now = arg(), arg(), tonumber(arg())
redis.call('HSET', K.supervisors, me, entry)
local all = redis.call('HGETALL', K.supervisors)
local alive = {}
for i = 1, #all, 2 do
  if tonumber(cjson.decode(all[i + 1])[1]) <= now then
    redis.call('HDEL', K.supervisors, all[i])
  else
    alive[#alive + 1] = all[i]
    alive[#alive + 1] = all[i + 1]
  end
end
return alive
"""
)

_PURGE = (
    _LUA_COMMON
    + """
local before, limit = arg(), tonumber(arg())
local ids = redis.call('ZRANGEBYSCORE', K.ended, '-inf', '(' .. before, 'LIMIT', 0, limit)
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', K.req(id), 'key', 'status', 'to_run')
  if f[1] then redis.call('HDEL', K.keys, f[1]) end
  if f[3] and f[3] ~= '0' then redis.call('HINCRBY', K.totals, 'to_run', -tonumber(f[3])) end
  if f[2] then redis.call('ZREM', K.status(f[2]), id) end
  redis.call('ZREM', K.created, id)
  redis.call('ZREM', K.ended, id)
  redis.call('DEL', K.req(id), K.rjobs(id), K.parts(id), K.pver(id))
end
return #ids
"""
)
