-- Puts every lease of `holders` (nodes found dead) back at the front of
-- ready.
-- KEYS: ready, leases, holders
-- ARGV: holders...
-- Returns how many.
-- Complexity: O(L + k log N) for L leases in the domain, k reclaimed.
local dead = {}
for i = 1, #ARGV do dead[ARGV[i]] = true end
local all = redis.call('HGETALL', KEYS[3])
local n = 0
local score = nil
for i = 1, #all, 2 do
  if dead[all[i + 1]] then
    if score == nil then
      local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
      score = 0
      if #first > 0 then score = tonumber(first[2]) - 1 end
    end
    redis.call('ZREM', KEYS[2], all[i])
    redis.call('HDEL', KEYS[3], all[i])
    redis.call('ZADD', KEYS[1], score, all[i])
    score = score - 1
    n = n + 1
  end
end
return n
