-- Hands out up to `max` due deliveries of one domain, oldest first, each
-- under a lease of `holder` that runs out `lease` ms from now (Redis clock).
-- KEYS: ready, leases, holders, suspended
-- ARGV: max, holder, lease ms
-- Returns {lease expiry ms, {ids}} ({} while the domain is suspended).
-- Complexity: O(k log N) for k ids taken, N ids in the domain.
if redis.call('EXISTS', KEYS[4]) == 1 then return {} end
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3])
local taken = {}
local popped = redis.call('ZPOPMIN', KEYS[1], tonumber(ARGV[1]))
for i = 1, #popped, 2 do
  local id = popped[i]
  if not redis.call('ZSCORE', KEYS[2], id) then
    redis.call('ZADD', KEYS[2], expiry, id)
    redis.call('HSET', KEYS[3], id, ARGV[2])
    taken[#taken + 1] = id
  end
end
return {expiry, taken}
