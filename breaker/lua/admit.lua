-- admit: ask to make a call. ARGV[16]: a lease id to hold a probe slot with in HALF_OPEN.
-- status 1: admitted (in HALF_OPEN the lease holds a probe slot); 0: refused.
local lease_id = ARGV[16]
begin()
expire_open()
if c.state == 'closed' then
  return reply(1)
end
if c.state == 'half_open' then
  redis.call('ZREMRANGEBYSCORE', P, '-inf', now())
  if redis.call('ZCARD', P) < HALF_OPEN_MAX then
    redis.call('ZADD', P, now() + LEASE, lease_id)
    redis.call('PEXPIRE', P, TTL)
    return reply(1)
  end
end
redis.call('HINCRBY', H, 'rejected', 1)
return reply(0)
