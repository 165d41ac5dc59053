-- Hands out up to `max` due deliveries of one domain, oldest first, each
-- under a lease of `holder` that runs out `lease` ms from now (Redis clock).
-- KEYS: ready, leases, holders, suspended, then (one server only) the
--       domain timers
-- ARGV: max, holder, lease ms, then (with the timers) the domain
-- Returns {lease expiry ms, {ids}} ({} while the domain is suspended;
-- {0, {}} when nothing is due).
-- With the timers, the domain's timer is brought forward to the expiry of
-- the leases it hands out, in the same call: nothing can come between the
-- leases and their timer. Without them the caller adds the timer, before
-- and after.
-- Many nodes ask a domain that has just been emptied by another: such a
-- take runs one command. An id popped that is leased already stays with
-- its holder. The ids are checked and leased a chunk at a time
-- (`ZMSCORE`, a `ZADD` and an `HSET` of many), so the commands a call
-- runs do not grow with `max`.
-- Complexity: O(k log N) for k ids taken, N ids in the domain.
local CHUNK = 1000
local popped = redis.call('ZPOPMIN', KEYS[1], tonumber(ARGV[1]))
if #popped == 0 then return {0, {}} end
if redis.call('EXISTS', KEYS[4]) == 1 then
  -- Suspended: the ids go back where they were.
  for first = 1, #popped, 2 * CHUNK do
    local back = {}
    for i = first, math.min(#popped, first + 2 * CHUNK - 1), 2 do
      back[#back + 1] = popped[i + 1]
      back[#back + 1] = popped[i]
    end
    redis.call('ZADD', KEYS[1], unpack(back))
  end
  return {}
end
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3])
local taken = {}
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
if #taken > 0 and KEYS[5] then redis.call('ZADD', KEYS[5], 'LT', expiry, ARGV[4]) end
return {expiry, taken}
