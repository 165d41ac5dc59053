-- Puts a delivery held by `holder` back at the front of ready, untried.
-- KEYS: ready, leases, holders
-- ARGV: id, holder, channel, news
-- Publishes `news` on `channel` (unless it is '') when ready was empty.
-- A refusal (an ACL user without the channel) is ignored: news only
-- hurries the other nodes, the work is filed all the same.
-- Returns 1 if it was put back, 0 if `holder` does not hold it.
-- Complexity: O(log N).
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local score = 0
if #first > 0 then score = tonumber(first[2]) - 1 end
if #first == 0 and ARGV[3] ~= '' then redis.pcall('PUBLISH', ARGV[3], ARGV[4]) end
redis.call('ZADD', KEYS[1], score, ARGV[1])
return 1
