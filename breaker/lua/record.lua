-- record: report how an admitted call ended.
-- ARGV[16] generation it was admitted in, ARGV[17] its lease id ('' if none),
-- ARGV[18] outcome: 0 success, 1 failure, 2 ignored (free the slot, count nothing),
-- ARGV[19] 1 if the call was slow (only sent with a slow-call rule), else 0,
-- ARGV[20] the wait (ms) a failure asked for (Retry-After), 0 if none.
-- status 1: the outcome moved the state machine; 0: it came from an older generation
-- (or was ignored) and only the running totals changed.
local gen, lease_id, outcome = tonumber(ARGV[16]), ARGV[17], tonumber(ARGV[18])
local slow, wait_ms = tonumber(ARGV[19]), tonumber(ARGV[20])
begin()
if lease_id ~= '' then redis.call('ZREM', P, lease_id) end
if outcome == 2 then return reply(0) end
local failed = outcome == 1
redis.call('HINCRBY', H, failed and 'failures' or 'successes', 1)
if slow == 1 then redis.call('HINCRBY', H, 'slow_calls', 1) end
expire_open()
if gen ~= c.gen then return reply(0) end
if not failed then wait_ms = 0 end
if c.state == 'closed' then
  if failed then
    c.fc = c.fc + 1
    if c.fc >= FAILURE_THRESHOLD then
      open('failures', c.fc, wait_ms)
      return reply(1)
    end
    redis.call('HSET', H, 'fc', c.fc)
  elseif c.fc ~= 0 then
    c.fc = 0
    redis.call('HSET', H, 'fc', 0)
  end
  if WINDOWED then
    window_add(1, failed and 1 or 0, slow)
    if failed or slow == 1 then
      local n, fl, s = window_counts()
      if n >= MINIMUM_CALLS then
        if FAILURE_RATE > 0 and fl / n >= FAILURE_RATE then
          open('failure_rate', n, wait_ms)
        elseif SLOW_RATE > 0 and s / n >= SLOW_RATE then
          open('slow_calls', n, wait_ms)
        end
      end
    end
  end
elseif c.state == 'half_open' then
  if failed then
    redis.call('HINCRBY', H, 'half_open_failures', 1)
    open('probe_failed', 1, wait_ms)
  else
    redis.call('HINCRBY', H, 'half_open_successes', 1)
    if slow == 1 then
      -- A probe that answers slowly shows no recovery from slowness.
      open('slow_calls', 1, 0)
    else
      c.sc = c.sc + 1
      if c.sc >= SUCCESS_THRESHOLD then
        move('closed', now(), 'recovered', c.sc)
      else
        redis.call('HSET', H, 'sc', c.sc)
      end
    end
  end
end
return reply(1)
