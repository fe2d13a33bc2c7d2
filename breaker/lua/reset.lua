-- reset: an operator closes the circuit; consecutive counts cleared, running totals kept.
-- A new generation, so calls admitted before the reset cannot count against it.
begin()
expire_open()
if c.state ~= 'closed' then
  move('closed', now(), 'reset', 0)
else
  c.gen, c.fc, c.sc = c.gen + 1, 0, 0
  redis.call('HSET', H, 'gen', c.gen, 'fc', 0, 'sc', 0)
  redis.call('DEL', W)
end
return reply(1)
