-- What a domain holds, read at one instant (a move between two of its keys
-- cannot hide a delivery), for whoever took it out of the domain sets.
-- KEYS: ready, deferred, leases
-- Returns {deliveries in all three, ready ones, next timer ms or -1}: the
-- earliest of its next deferred attempt and its next lease expiry.
-- Complexity: O(log N).
local ready = redis.call('ZCARD', KEYS[1])
local all = ready + redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[3])
local next = -1
for _, key in ipairs({KEYS[2], KEYS[3]}) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #first > 0 and (next < 0 or tonumber(first[2]) < next) then next = tonumber(first[2]) end
end
return {all, ready, next}
