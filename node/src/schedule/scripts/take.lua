-- Hands out up to `max` due deliveries of one domain, oldest first, each
-- under a lease of `holder` that runs out `lease` ms from now (Redis clock).
-- KEYS: ready, leases, holders, suspended
-- ARGV: max, holder, lease ms
-- Returns {lease expiry ms, {ids}} ({} while the domain is suspended).
-- An id popped that is leased already stays with its holder. The ids are
-- checked and leased a chunk at a time (`ZMSCORE`, a `ZADD` and an `HSET`
-- of many), so the commands a call runs do not grow with `max`.
-- Complexity: O(k log N) for k ids taken, N ids in the domain.
local CHUNK = 1000
if redis.call('EXISTS', KEYS[4]) == 1 then return {} end
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3])
local taken = {}
local popped = redis.call('ZPOPMIN', KEYS[1], tonumber(ARGV[1]))
for first = 1, #popped, 2 * CHUNK do
  local ids = {}
  for i = first, math.min(#popped, first + 2 * CHUNK - 1), 2 do ids[#ids + 1] = popped[i] end
  local leased = redis.call('ZMSCORE', KEYS[2], unpack(ids))
  local leases, holders = {}, {}
  for n, id in ipairs(ids) do
    if not leased[n] then
      leases[#leases + 1] = expiry
      leases[#leases + 1] = id
      holders[#holders + 1] = id
      holders[#holders + 1] = ARGV[2]
      taken[#taken + 1] = id
    end
  end
  if #leases > 0 then
    redis.call('ZADD', KEYS[2], unpack(leases))
    redis.call('HSET', KEYS[3], unpack(holders))
  end
end
return {expiry, taken}
