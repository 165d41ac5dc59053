-- Extends the leases of `holder` among `ids`; a lease of `holder` not among
-- them that was taken more than `grace` ago is an orphan (a take whose reply
-- was lost, a completion that failed half-way, an earlier process of the
-- same node) and goes back to the front of ready.
-- KEYS: ready, leases, holders
-- ARGV: holder, lease ms, grace ms, ids...
-- Returns {renewed, orphans}.
-- Complexity: O(L + n log N) for L leases in the domain (bounded by the
-- connections and expiry claims on it) and n ids.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local held = {}
local renewed = 0
for i = 4, #ARGV do
  held[ARGV[i]] = true
  if redis.call('HGET', KEYS[3], ARGV[i]) == ARGV[1] then
    redis.call('ZADD', KEYS[2], 'XX', now + lease, ARGV[i])
    renewed = renewed + 1
  end
end
local orphans = 0
local score = nil
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local id = all[i]
  if all[i + 1] == ARGV[1] and not held[id] then
    local expiry = tonumber(redis.call('ZSCORE', KEYS[2], id) or '0')
    if expiry - lease < now - tonumber(ARGV[3]) then
      if score == nil then
        local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
        score = 0
        if #first > 0 then score = tonumber(first[2]) - 1 end
      end
      redis.call('ZREM', KEYS[2], id)
      redis.call('HDEL', KEYS[3], id)
      redis.call('ZADD', KEYS[1], score, id)
      score = score - 1
      orphans = orphans + 1
    end
  end
end
return {renewed, orphans}
