-- Files deliveries of one domain after their attempts, as file.lua does
-- one: each drops its lease and goes to deferred (or nowhere when it is
-- done, and then out of the domain's messages), with one command per set
-- for them all.
-- KEYS: ready, deferred, leases, holders, messages
-- ARGV: (id, holder ('' = nobody may hold it), next attempt ms ('' =
--       done))..., each id once
-- Returns per delivery {filed 1/0, 1 if the domain holds no work at all
-- now}: only the last delivery filed as done says the domain is empty.
-- The listings a finished message leaves (the index, the sender's) are in
-- other slots on a Cluster: the caller removes it from them.
-- Complexity: O(n log N) for n deliveries.
local ready, deferred, leases, holders, messages = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ids = {}
for i = 1, #ARGV, 3 do ids[#ids + 1] = ARGV[i] end
local held = redis.call('HMGET', holders, unpack(ids))
local results, filed, loose, retries, finished = {}, {}, {}, {}, {}
local last_done = nil
for j, id in ipairs(ids) do
  local holder, at = ARGV[3 * j - 1], ARGV[3 * j]
  local ok
  if holder == '' then ok = not held[j] else ok = held[j] == holder end
  results[j] = {ok and 1 or 0, 0}
  if ok then
    filed[#filed + 1] = id
    if holder == '' then loose[#loose + 1] = id end
    if at ~= '' then
      retries[#retries + 1] = at
      retries[#retries + 1] = id
    else
      finished[#finished + 1] = id
      last_done = j
    end
  end
end
if #filed > 0 then
  redis.call('ZREM', leases, unpack(filed))
  redis.call('HDEL', holders, unpack(filed))
end
if #loose > 0 then
  redis.call('ZREM', ready, unpack(loose))
  redis.call('ZREM', deferred, unpack(loose))
end
if #retries > 0 then redis.call('ZADD', deferred, unpack(retries)) end
if #finished > 0 then
  redis.call('ZREM', messages, unpack(finished))
  local left = false
  for _, key in ipairs({leases, ready, deferred}) do
    if redis.call('ZCARD', key) > 0 then left = true break end
  end
  if not left then results[last_done][2] = 1 end
end
return results
