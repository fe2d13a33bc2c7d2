-- Prelude shared by every operation on one circuit (prepended to each script).
--
-- KEYS[1]  the circuit hash            breaker:{<name>}
-- KEYS[2]  the probe lease sorted set  breaker:{<name>}:probes  (member: lease id, score: expiry ms)
-- KEYS[3]  the outcome window hash     breaker:{<name>}:window  (field b<i>: '<bucket> <calls>
--          <failures> <slow calls>' for time bucket number <bucket>, kept in field i = bucket % 10)
-- ARGV[1]  failure_threshold         ARGV[2]  timeout (ms): the base open duration
-- ARGV[3]  success_threshold         ARGV[4]  half_open_max_calls
-- ARGV[5]  probe lease (ms)          ARGV[6]  key TTL (ms)
-- ARGV[7]  open_backoff (multiplier) ARGV[8]  max timeout (ms): the cap on any open duration
-- ARGV[9]  failure_rate_threshold (0: no failure-rate rule)
-- ARGV[10] slow_call_rate_threshold (0: no slow-call rule)
-- ARGV[11] window bucket width (ms)  ARGV[12] minimum_calls
-- ARGV[13] generation the batched counts below were made in (0: nothing batched)
-- ARGV[14] successes the caller batched (CLOSED, no failure counted) since its last write
-- ARGV[15] calls the caller refused from its cache since its last write
-- ARGV[16..] operation-specific
--
-- Reply: {status, state, generation, failure_count, success_count, retry_after_ms,
--         [from, to, cause, count, open_ms]...}; one quintuple per transition this call
--         made, open_ms being how long an opening lasts (0 for other transitions).
-- Times are Redis server milliseconds (TIME), so every client shares one clock.
-- Every operation calls begin() before anything else writes: see there.
redis.replicate_commands()

local H, P, W = KEYS[1], KEYS[2], KEYS[3]
local FAILURE_THRESHOLD = tonumber(ARGV[1])
local TIMEOUT = tonumber(ARGV[2])
local SUCCESS_THRESHOLD = tonumber(ARGV[3])
local HALF_OPEN_MAX = tonumber(ARGV[4])
local LEASE = tonumber(ARGV[5])
local TTL = tonumber(ARGV[6])
local BACKOFF = tonumber(ARGV[7])
local MAX_TIMEOUT = tonumber(ARGV[8])
local FAILURE_RATE = tonumber(ARGV[9])
local SLOW_RATE = tonumber(ARGV[10])
local BUCKET = tonumber(ARGV[11])
local MINIMUM_CALLS = tonumber(ARGV[12])
local WINDOWED = FAILURE_RATE > 0 or SLOW_RATE > 0
-- The window is this many buckets, the current one included (breaker/window.py says the same).
local BUCKETS = 10
local HALF_OPEN_RETRY = math.min(1000, TIMEOUT)

-- The server's clock in ms, read once and only when the operation needs it: recording a
-- success in CLOSED, the common case, does not.
local now_ms
local function now()
  if not now_ms then
    local clock = redis.call('TIME')
    now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  end
  return now_ms
end

local f = redis.call('HMGET', H, 'state', 'gen', 'fc', 'sc', 'opened_at', 'since', 'open_ms',
                     'reopens', 'created')
local c = {state = f[1], gen = tonumber(f[2]), fc = tonumber(f[3]) or 0,
           sc = tonumber(f[4]) or 0, opened_at = tonumber(f[5]) or 0, since = tonumber(f[6]) or 0,
           open_ms = tonumber(f[7]) or TIMEOUT, reopens = tonumber(f[8]) or 0,
           created = tonumber(f[9]) or 0}
local events = {}

-- The window: outcomes per time bucket, summed over the last BUCKETS buckets.
local function window_add(calls, failures, slow)
  local bucket = math.floor(now() / BUCKET)
  local field = 'b' .. (bucket % BUCKETS)
  local n, fl, s = 0, 0, 0
  local v = redis.call('HGET', W, field)
  if v then
    local b, pn, pf, ps = string.match(v, '^(%d+) (%d+) (%d+) (%d+)$')
    if tonumber(b) == bucket then n, fl, s = tonumber(pn), tonumber(pf), tonumber(ps) end
  end
  redis.call('HSET', W, field,
             string.format('%d %d %d %d', bucket, n + calls, fl + failures, s + slow))
  redis.call('PEXPIRE', W, TTL)
end

local function window_counts()
  local bucket = math.floor(now() / BUCKET)
  local fields = {}
  for i = 0, BUCKETS - 1 do fields[i + 1] = 'b' .. i end
  local values = redis.call('HMGET', W, unpack(fields))
  local n, fl, s = 0, 0, 0
  for i = 1, BUCKETS do
    local v = values[i]
    if v then
      local b, pn, pf, ps = string.match(v, '^(%d+) (%d+) (%d+) (%d+)$')
      b = tonumber(b)
      if b and b > bucket - BUCKETS and b <= bucket then
        n, fl, s = n + tonumber(pn), fl + tonumber(pf), s + tonumber(ps)
      end
    end
  end
  return n, fl, s
end

-- The first write of every operation, and a command Redis refuses whenever it refuses writes
-- (maxmemory with noeviction, MISCONF, a read-only replica): Redis checks only a script's
-- first such write, so a script that gets past this line runs whole, and one that does not
-- changed nothing (the caller then keeps its batched counts for a later write).
local function begin()
  local batch_gen, successes, rejected = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
  -- Counts made before the keys expired (or were deleted) belong to no circuit there is now.
  if not c.state or batch_gen < c.created then successes, rejected = 0, 0 end
  redis.call('HINCRBY', H, 'rejected', rejected)
  if not c.state then
    -- A circuit created again after its keys expired starts from a generation that no
    -- ticket handed out before can carry.
    c.state, c.gen, c.since, c.created = 'closed', now(), now(), now()
    redis.call('HSET', H, 'state', 'closed', 'gen', now(), 'fc', 0, 'sc', 0, 'since', now(),
               'created', now())
    -- Here and not only in reply(): read creates the hash too but never calls reply().
    redis.call('PEXPIRE', H, TTL)
  end
  if successes > 0 then
    redis.call('HINCRBY', H, 'successes', successes)
    if WINDOWED and c.state == 'closed' and batch_gen == c.gen then window_add(successes, 0, 0) end
  end
end

local function move(to, at, cause, count)
  local from = c.state
  redis.call('HINCRBY', H, 'secs:' .. from, math.max(0, at - c.since))
  redis.call('HINCRBY', H, 'tr:' .. from .. '->' .. to, 1)
  c.state, c.gen, c.fc, c.sc, c.since = to, c.gen + 1, 0, 0, at
  redis.call('HSET', H, 'state', to, 'gen', c.gen, 'fc', 0, 'sc', 0, 'since', at)
  local open_ms = 0
  if to == 'open' then
    c.opened_at, open_ms = at, c.open_ms
    redis.call('HSET', H, 'opened_at', at)
  elseif to == 'closed' then
    -- A close ends the backoff: the next opening lasts the base timeout again.
    c.open_ms, c.reopens = TIMEOUT, 0
    redis.call('HSET', H, 'open_ms', TIMEOUT, 'reopens', 0)
  end
  redis.call('DEL', P)
  -- Every state starts with an empty window, as in resilience4j.
  redis.call('DEL', W)
  for _, v in ipairs({from, to, cause, count, open_ms}) do table.insert(events, v) end
end

-- How long an opening lasts after reopens consecutive failed probes: backoff, capped.
local function policy_open_ms(reopens)
  if reopens == 0 or BACKOFF == 1 then return TIMEOUT end
  return math.floor(math.min(MAX_TIMEOUT, TIMEOUT * BACKOFF ^ reopens))
end

-- Open for the policy's duration, or for the dependency's own wait (wait_ms) if longer, capped.
local function open(cause, count, wait_ms)
  if c.state == 'half_open' and cause ~= 'forced' then c.reopens = c.reopens + 1 end
  local duration = policy_open_ms(c.reopens)
  if wait_ms > 0 then
    duration = math.min(MAX_TIMEOUT, math.max(duration, wait_ms))
    cause = 'retry_after'
  end
  c.open_ms = duration
  redis.call('HSET', H, 'open_ms', duration, 'reopens', c.reopens, 'cause', cause)
  redis.call('HINCRBY', H, 'opened:' .. cause, 1)
  move('open', now(), cause, count)
end

-- OPEN becomes HALF_OPEN lazily, dated when the timeout ran out rather than when noticed.
local function expire_open()
  if c.state == 'open' and now() >= c.opened_at + c.open_ms then
    move('half_open', c.opened_at + c.open_ms, 'timeout', 0)
  end
end

local function retry_after()
  if c.state == 'open' then return c.opened_at + c.open_ms - now() end
  if c.state == 'half_open' then
    redis.call('ZREMRANGEBYSCORE', P, '-inf', now())
    if redis.call('ZCARD', P) >= HALF_OPEN_MAX then return HALF_OPEN_RETRY end
  end
  return 0
end

local function reply(status)
  redis.call('PEXPIRE', H, TTL)
  local r = {status, c.state, c.gen, c.fc, c.sc, retry_after()}
  for _, v in ipairs(events) do table.insert(r, v) end
  return r
end
