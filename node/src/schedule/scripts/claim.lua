-- Leases each id that is not leased already, wherever it waits (ready,
-- deferred, suspended or in no key at all), so that one expiry sweep alone
-- expires it; a claimed id is listed in the domain's messages.
-- KEYS: ready, deferred, leases, holders, messages
-- ARGV: holder, lease ms, ids...
-- Returns {lease expiry ms, {ids claimed}}.
-- Complexity: O(n log N) for n ids.
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local claimed = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if not redis.call('ZSCORE', KEYS[3], id) then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[3], expiry, id)
    redis.call('HSET', KEYS[4], id, ARGV[1])
    redis.call('ZADD', KEYS[5], 0, id)
    claimed[#claimed + 1] = id
  end
end
return {expiry, claimed}
