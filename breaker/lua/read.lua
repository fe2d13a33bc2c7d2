-- read: the circuit as it stands now; changes nothing but flushing the batched counts.
-- Reply: {state, failure_count, success_count, retry_after_ms, opened_at_ms (0: never),
--         now_ms, open_ms, window_calls, window_failures, window_slow_calls, field, value, ...}:
-- the hash's running totals, 'tr:<from>-><to>' transition counts, 'opened:<cause>' openings
-- and 'secs:<state>' milliseconds in each state, with the current period and a timeout that
-- ran out unnoticed (OPEN that is really HALF_OPEN) counted in.
begin()
local raw = redis.call('HGETALL', H)
local t = {}
for i = 1, #raw, 2 do t[raw[i]] = raw[i + 1] end
local state, fc, sc, since = c.state, c.fc, c.sc, c.since
local secs = {}
for _, s in ipairs({'closed', 'open', 'half_open'}) do
  secs[s] = tonumber(t['secs:' .. s]) or 0
  t['secs:' .. s] = nil
end
local ends = c.opened_at + c.open_ms
local expired = state == 'open' and now() >= ends
if expired then
  secs.open = secs.open + math.max(0, ends - since)
  state, fc, sc, since = 'half_open', 0, 0, ends
  t['tr:open->half_open'] = (tonumber(t['tr:open->half_open']) or 0) + 1
end
secs[state] = secs[state] + math.max(0, now() - since)
local retry = 0
if state == 'open' then
  retry = ends - now()
elseif state == 'half_open' and not expired then
  if redis.call('ZCOUNT', P, '(' .. now(), '+inf') >= HALF_OPEN_MAX then retry = HALF_OPEN_RETRY end
end
local wn, wf, ws = 0, 0, 0
if WINDOWED then wn, wf, ws = window_counts() end
local r = {state, fc, sc, retry, c.opened_at, now(), c.open_ms, wn, wf, ws}
for k, v in pairs(t) do
  table.insert(r, k); table.insert(r, v)
end
for _, s in ipairs({'closed', 'open', 'half_open'}) do
  table.insert(r, 'secs:' .. s); table.insert(r, secs[s])
end
return r
