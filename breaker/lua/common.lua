-- Prelude shared by every operation on one circuit (prepended to each script).
--
-- KEYS[1]  the circuit hash            breaker:{<name>}
-- KEYS[2]  the probe lease sorted set  breaker:{<name>}:probes  (member: lease id, score: expiry ms)
-- ARGV[1]  failure_threshold     ARGV[2]  timeout (ms)
-- ARGV[3]  success_threshold     ARGV[4]  half_open_max_calls
-- ARGV[5]  probe lease (ms)      ARGV[6]  key TTL (ms)
-- ARGV[7]  rejected calls counted by the caller since its last write, to add to the total
-- ARGV[8..] operation-specific
--
-- Reply: {status, state, generation, failure_count, success_count, retry_after_ms,
--         [from, to, cause, count]...}; one quadruple per transition this call made.
-- Times are Redis server milliseconds (TIME), so every client shares one clock.
redis.replicate_commands()

local H, P = KEYS[1], KEYS[2]
local FAILURE_THRESHOLD = tonumber(ARGV[1])
local TIMEOUT = tonumber(ARGV[2])
local SUCCESS_THRESHOLD = tonumber(ARGV[3])
local HALF_OPEN_MAX = tonumber(ARGV[4])
local LEASE = tonumber(ARGV[5])
local TTL = tonumber(ARGV[6])
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

local f = redis.call('HMGET', H, 'state', 'gen', 'fc', 'sc', 'opened_at', 'since')
local c = {state = f[1], gen = tonumber(f[2]), fc = tonumber(f[3]) or 0,
           sc = tonumber(f[4]) or 0, opened_at = tonumber(f[5]) or 0, since = tonumber(f[6]) or 0}
local events = {}

if not c.state then
  -- A circuit created again after its keys expired starts from a generation that no
  -- ticket handed out before can carry.
  c.state, c.gen, c.since = 'closed', now(), now()
  redis.call('HSET', H, 'state', 'closed', 'gen', now(), 'fc', 0, 'sc', 0, 'since', now(),
             'created', now())
  -- Here and not only in reply(): read creates the hash too but never calls reply().
  redis.call('PEXPIRE', H, TTL)
end

local pending_rejected = tonumber(ARGV[7])
if pending_rejected > 0 then
  redis.call('HINCRBY', H, 'rejected', pending_rejected)
end

local function move(to, at, cause)
  local from, count = c.state, c.fc
  if cause == 'recovered' then count = c.sc end
  redis.call('HINCRBY', H, 'secs:' .. from, math.max(0, at - c.since))
  redis.call('HINCRBY', H, 'tr:' .. from .. '->' .. to, 1)
  c.state, c.gen, c.fc, c.sc, c.since = to, c.gen + 1, 0, 0, at
  redis.call('HSET', H, 'state', to, 'gen', c.gen, 'fc', 0, 'sc', 0, 'since', at)
  if to == 'open' then
    c.opened_at = at
    redis.call('HSET', H, 'opened_at', at)
  end
  redis.call('DEL', P)
  for _, v in ipairs({from, to, cause, count}) do table.insert(events, v) end
end

-- OPEN becomes HALF_OPEN lazily, dated when the timeout ran out rather than when noticed.
local function expire_open()
  if c.state == 'open' and now() >= c.opened_at + TIMEOUT then
    move('half_open', c.opened_at + TIMEOUT, 'timeout')
  end
end

local function retry_after()
  if c.state == 'open' then return c.opened_at + TIMEOUT - now() end
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
