-- record: report how an admitted call ended.
-- ARGV[8] generation it was admitted in, ARGV[9] its lease id ('' if none),
-- ARGV[10] outcome: 0 success, 1 failure, 2 ignored (free the slot, count nothing).
-- status 1: the outcome moved the state machine; 0: it came from an older generation
-- (or was ignored) and only the running totals changed.
local gen, lease_id, outcome = tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[10])
if lease_id ~= '' then redis.call('ZREM', P, lease_id) end
if outcome == 2 then return reply(0) end
redis.call('HINCRBY', H, outcome == 1 and 'failures' or 'successes', 1)
expire_open()
if gen ~= c.gen then return reply(0) end
if c.state == 'closed' then
  if outcome == 1 then
    c.fc = c.fc + 1
    if c.fc >= FAILURE_THRESHOLD then
      move('open', now(), 'failures')
    else
      redis.call('HSET', H, 'fc', c.fc)
    end
  elseif c.fc ~= 0 then
    c.fc = 0
    redis.call('HSET', H, 'fc', 0)
  end
elseif c.state == 'half_open' then
  if outcome == 1 then
    redis.call('HINCRBY', H, 'half_open_failures', 1)
    move('open', now(), 'probe_failed')
  else
    redis.call('HINCRBY', H, 'half_open_successes', 1)
    c.sc = c.sc + 1
    if c.sc >= SUCCESS_THRESHOLD then
      move('closed', now(), 'recovered')
    else
      redis.call('HSET', H, 'sc', c.sc)
    end
  end
end
return reply(1)
