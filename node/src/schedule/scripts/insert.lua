-- Files new deliveries unless they are already queued (ready, deferred or
-- leased): due ones at the back of ready, the others in deferred. Every id
-- is listed in the domain's messages, queued already or not (a rescan
-- lists what an earlier release queued).
-- KEYS: ready, deferred, leases, suspended, messages
-- ARGV: channel, news, (id, next attempt ms, due 1/0)...
-- Publishes `news` on `channel` (unless it is '') when ready was empty and
-- now has work, and the domain is not suspended: the other nodes hear of
-- the domain at once (see `news.rs`).
-- A refusal (an ACL user without the channel) is ignored: news only
-- hurries the other nodes, the work is filed all the same.
-- Returns {suspended 1/0, timer}: timer is the domain's next timer ms (the
-- earliest of its next deferred attempt and its next lease expiry) when
-- an id was already deferred or leased (a rescan: the caller puts the
-- timer back in case it was lost), else -1.
-- Complexity: O(n log N) for n ids.
local score = nil
local queued = false
local woke = false
for i = 3, #ARGV, 3 do
  local id = ARGV[i]
  redis.call('ZADD', KEYS[5], 0, id)
  if redis.call('ZSCORE', KEYS[3], id) or redis.call('ZSCORE', KEYS[2], id) then
    queued = true
  elseif not redis.call('ZSCORE', KEYS[1], id) then
    if ARGV[i + 2] == '1' then
      if score == nil then
        local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
        score = 0
        if #last > 0 then score = tonumber(last[2]) + 1 else woke = true end
      end
      redis.call('ZADD', KEYS[1], score, id)
      score = score + 1
    else
      redis.call('ZADD', KEYS[2], ARGV[i + 1], id)
    end
  end
end
local timer = -1
if queued then
  for _, key in ipairs({KEYS[2], KEYS[3]}) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #first > 0 and (timer < 0 or tonumber(first[2]) < timer) then timer = tonumber(first[2]) end
  end
end
local suspended = redis.call('EXISTS', KEYS[4])
if woke and suspended == 0 and ARGV[1] ~= '' then redis.pcall('PUBLISH', ARGV[1], ARGV[2]) end
return {suspended, timer}
