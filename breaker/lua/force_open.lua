-- force_open: an operator isolates the dependency now; an open circuit restarts its timeout.
expire_open()
if c.state ~= 'open' then
  move('open', now(), 'forced')
else
  c.gen, c.opened_at = c.gen + 1, now()
  redis.call('HSET', H, 'gen', c.gen, 'opened_at', now())
end
return reply(1)
