-- Files new deliveries unless they are already queued (ready, deferred or
-- leased): due ones at the back of ready, the others in deferred.
-- KEYS: ready, deferred, leases, suspended
-- ARGV: (id, next attempt ms, due 1/0)...
-- Returns 1 while the domain is suspended, else 0.
-- Complexity: O(n log N) for n ids.
local score = nil
for i = 1, #ARGV, 3 do
  local id = ARGV[i]
  if not redis.call('ZSCORE', KEYS[3], id) and not redis.call('ZSCORE', KEYS[2], id)
      and not redis.call('ZSCORE', KEYS[1], id) then
    if ARGV[i + 2] == '1' then
      if score == nil then
        local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
        score = 0
        if #last > 0 then score = tonumber(last[2]) + 1 end
      end
      redis.call('ZADD', KEYS[1], score, id)
      score = score + 1
    else
      redis.call('ZADD', KEYS[2], ARGV[i + 1], id)
    end
  end
end
return redis.call('EXISTS', KEYS[4])
