-- Moves up to `limit` deliveries due by `now` from deferred to the back of
-- ready.
-- KEYS: deferred, ready, suspended, leases
-- ARGV: now ms, limit, channel, news
-- Publishes `news` on `channel` (unless it is '') when ready was empty and
-- now has work, and the domain is not suspended.
-- A refusal (an ACL user without the channel) is ignored: news only
-- hurries the other nodes, the work is filed all the same.
-- Returns {moved, suspended 1/0, the domain's next timer ms or -1}: the
-- earliest of its next deferred attempt and its next lease expiry.
-- Complexity: O((k + 1) log N) for k moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then
  local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  local score = 0
  if #last > 0 then score = tonumber(last[2]) + 1 end
  if #last == 0 and ARGV[3] ~= '' and redis.call('EXISTS', KEYS[3]) == 0 then
    redis.pcall('PUBLISH', ARGV[3], ARGV[4])
  end
  for _, id in ipairs(due) do
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], score, id)
    score = score + 1
  end
end
local next = -1
for _, key in ipairs({KEYS[1], KEYS[4]}) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #first > 0 and (next < 0 or tonumber(first[2]) < next) then next = tonumber(first[2]) end
end
return {#due, redis.call('EXISTS', KEYS[3]), next}
