-- Puts up to `limit` deliveries whose lease ran out (Redis clock) back at
-- the front of ready, in lease order.
-- KEYS: ready, leases, holders, deferred
-- ARGV: limit, channel, news
-- Publishes `news` on `channel` (unless it is '') when ready was empty.
-- A refusal (an ACL user without the channel) is ignored: news only
-- hurries the other nodes, the work is filed all the same.
-- Returns {reclaimed, the domain's next timer ms or -1} (see promote.lua).
-- Complexity: O((k + 1) log N) for k reclaimed.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
if #expired > 0 then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local score = 0
  if #first > 0 then score = tonumber(first[2]) - 1 end
  if #first == 0 and ARGV[2] ~= '' then redis.pcall('PUBLISH', ARGV[2], ARGV[3]) end
  for i = #expired, 1, -1 do
    redis.call('ZREM', KEYS[2], expired[i])
    redis.call('HDEL', KEYS[3], expired[i])
    redis.call('ZADD', KEYS[1], score, expired[i])
    score = score - 1
  end
end
local next = -1
for _, key in ipairs({KEYS[4], KEYS[2]}) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #first > 0 and (next < 0 or tonumber(first[2]) < next) then next = tonumber(first[2]) end
end
return {#expired, next}
