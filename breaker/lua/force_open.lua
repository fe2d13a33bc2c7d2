-- force_open: an operator isolates the dependency now; an open circuit restarts its timeout.
begin()
expire_open()
if c.state ~= 'open' then
  open('forced', 0, 0)
else
  c.gen, c.opened_at = c.gen + 1, now()
  redis.call('HSET', H, 'gen', c.gen, 'opened_at', now())
end
return reply(1)
