"""The Lua scripts: each one atomic step on Redis, so no crash leaves a job half-changed.

Scripts that finish, start, report or hand back work carry `flags=allow-oom`: work already
accepted must be able to end even when Redis is at `maxmemory`. The submitting script does not:
a full Redis refuses new jobs (its first write fails, so nothing is written) and the API answers
503.
"""

from __future__ import annotations

_ALLOW_OOM = "#!lua flags=allow-oom\n"

# KEYS: job, queued, stream, owner's in-flight set, idempotency, owner's token bucket, retry.
# ARGV: 1 job id, 2 created at, 3 request, 4 deadline, 5 max queued, 6 request hash,
# 7 idempotency ttl, 8 owner, 9 owner's max in flight (0: no cap), 10 idempotency used (1/0),
# 11 webhook url ('' for none), 12 webhook events (",a,b,"), 13 tokens a second (0: no limit),
# 14 burst, 15 not after (Redis clock; 0: any time), 16 retry mode (0 none, 1 record, 2 replay).
# Answers {outcome, value, Redis's clock}: a replay ('seen', "<job> <hash>"), a refusal ('late',
# 'rate' with the seconds to wait, 'full', 'busy'), or the job recorded and queued.
# 'late': the API gave up waiting for this call and answered 503 already; a command that Redis
# runs only after it came back from a stall must not create a job nobody was told of.
SUBMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local clock = tostring(now)
if tonumber(ARGV[15]) > 0 and now > tonumber(ARGV[15]) then return {'late', '', clock} end
if ARGV[10] == '1' then
  local seen = redis.call('GET', KEYS[5])
  if seen then return {'seen', seen, clock} end
end
if ARGV[16] == '2' then
  -- A retry lands on the job the first try made, while that job's record is there.
  local seen = redis.call('GET', KEYS[7])
  if seen and redis.call('EXISTS', 'sdserve:job:' .. string.match(seen, '^%S+')) == 1 then
    return {'seen', seen, clock}
  end
end
local rate, burst = tonumber(ARGV[13]), tonumber(ARGV[14])
local tokens = 0
if rate > 0 then
  local bucket = redis.call('HMGET', KEYS[6], 'tokens', 'at')
  local at = tonumber(bucket[2]) or now
  tokens = math.min(burst, (tonumber(bucket[1]) or burst) + math.max(0, now - at) * rate)
  if tokens < 1 then return {'rate', tostring((1 - tokens) / rate), clock} end
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return {'full', '', clock} end
local cap = tonumber(ARGV[9])
if cap > 0 and redis.call('SCARD', KEYS[4]) >= cap then return {'busy', '', clock} end
redis.call('HSET', KEYS[1], 'request', ARGV[3], 'status', 'queued', 'created_at', ARGV[2],
  'deadline', ARGV[4], 'runs', 0, 'owner', ARGV[8], 'webhook', ARGV[11],
  'webhook_events', ARGV[12])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
if cap > 0 then redis.call('SADD', KEYS[4], ARGV[1]) end
if rate > 0 then
  redis.call('HSET', KEYS[6], 'tokens', tokens - 1, 'at', now)
  redis.call('EXPIRE', KEYS[6], math.ceil(burst / rate) + 1)
end
if ARGV[10] == '1' then redis.call('SET', KEYS[5], ARGV[1] .. ' ' .. ARGV[6], 'EX', ARGV[7]) end
if ARGV[16] ~= '0' then redis.call('SET', KEYS[7], ARGV[1] .. ' ' .. ARGV[6], 'EX', ARGV[7]) end
return {'queued', ARGV[1], clock}
"""

# Lua, shared: queue a webhook event if the job has a webhook that wants this one.
_WEBHOOK_EVENT = """
local function webhook_event(job_key, events_key, job_id, event)
  local hook = redis.call('HMGET', job_key, 'webhook', 'webhook_events')
  if hook[1] and hook[1] ~= '' and string.find(hook[2] or '', ',' .. event .. ',', 1, true) then
    redis.call('XADD', events_key, '*', 'job', job_id, 'event', event)
  end
end
"""

# KEYS: job, queued, webhook events. ARGV: job id, now, worker, the delivery ("entry id:number
# of the delivery"). A running job comes back after its worker died. Answers 1 to run it, 0 if
# it ended meanwhile (or its record is gone), 2 if its deadline passed. The delivery that
# started it is kept: a worker that dies holding an entry it never started (read ahead into its
# inbox) did not die with it (WorkerStore._reclaim).
START = (
    _ALLOW_OOM
    + _WEBHOOK_EVENT
    + """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'queued' and s ~= 'running' then return 0 end
local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline'))
if deadline and tonumber(ARGV[2]) > deadline then return 2 end
if s == 'queued' and not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[2])
  webhook_event(KEYS[1], KEYS[3], ARGV[1], 'running')
end
redis.call('HSET', KEYS[1], 'status', 'running', 'step', 0, 'worker', ARGV[3],
  'delivery', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'runs', 1)
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
)

# KEYS: job, queued, owner's in-flight set, duration histogram, webhook events. ARGV: job id,
# status, now, result ttl, record ttl, error code, error message, histogram bounds
# ("0.5,1.0,..."), number of images (already in storage), the channel jobs' ends are published
# on (app/endings.py). A terminal state never changes: a late or repeated completion writes
# nothing, counts nothing and sends nothing.
FINISH = (
    _ALLOW_OOM
    + _WEBHOOK_EVENT
    + """
local s = redis.call('HGET', KEYS[1], 'status')
if s ~= 'queued' and s ~= 'running' then return 0 end
local created = tonumber(redis.call('HGET', KEYS[1], 'created_at'))
if created then
  local seconds = tonumber(ARGV[3]) - created
  local bucket = '+Inf'
  for bound in string.gmatch(ARGV[8], '[^,]+') do
    if seconds <= tonumber(bound) then bucket = bound break end
  end
  redis.call('HINCRBY', KEYS[4], ARGV[2] .. '|' .. bucket, 1)
  redis.call('HINCRBYFLOAT', KEYS[4], ARGV[2] .. '|sum', seconds)
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3], 'images', ARGV[9],
  'expires_at', ARGV[3] + ARGV[4], 'error_code', ARGV[6], 'error_message', ARGV[7])
redis.call('HDEL', KEYS[1], 'step')
redis.call('HINCRBY', KEYS[1], 'completions', 1)
webhook_event(KEYS[1], KEYS[5], ARGV[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[10], ARGV[1])
return 1
"""
)

# KEYS: job, preview. ARGV: step, finishing time ('' unknown), preview step ('' none), preview
# JPEG, its TTL. Written only while the job runs: after Redis lost its data, a progress write
# must not make up a record that holds nothing but a step.
REPORT = (
    _ALLOW_OOM
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'step', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'finish_at', ARGV[2]) end
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
  redis.call('HSET', KEYS[1], 'preview', ARGV[3])
end
return 1
"""
)

# KEYS: job, queued, stream. ARGV: job id, entry id, group. A worker hands back an entry it
# will not finish (stopping): a running job is queued again in its old place (its position
# comes from its creation time); a new entry goes to the stream for any worker, and the old
# one is acked. An ended job's entry is only acked.
HAND_BACK = (
    _ALLOW_OOM
    + """
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'running' or s == 'queued' then
  if s == 'running' then
    redis.call('HSET', KEYS[1], 'status', 'queued')
    redis.call('HDEL', KEYS[1], 'step', 'worker', 'finish_at', 'preview')
  end
  local created = redis.call('HGET', KEYS[1], 'created_at')
  redis.call('ZADD', KEYS[2], created, ARGV[1])
  redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
end
redis.call('XACK', KEYS[3], ARGV[3], ARGV[2])
return 1
"""
)

# KEYS: the worker's heartbeat, the set of workers. ARGV: name, this process's token, info,
# ttl. Answers 0 when another live process holds the name (its token is there), else 1.
HEARTBEAT = (
    _ALLOW_OOM
    + """
local holder = redis.call('HGET', KEYS[1], 'token')
if holder and holder ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'token', ARGV[2], 'info', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""
)

# KEYS: the worker's heartbeat. ARGV: this process's token, its pace (JSON). Between two
# heartbeats (a third of their TTL apart) the pace moves with every job that joins or leaves;
# it is written as often as progress, only while this process holds the name (never making a
# heartbeat key of its own: one that lapsed stays gone). A full Redis takes it, as it takes the
# heartbeat: a field the size of the one it replaces.
PACE = (
    _ALLOW_OOM
    + """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'pace', ARGV[2])
return 1
"""
)

# KEYS: the worker's heartbeat, the set of workers. ARGV: this process's token, name. Gives up
# the name only if this process holds it.
RETIRE = """
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[2])
end
return 1
"""
