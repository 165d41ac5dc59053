-- Files a delivery after an attempt or an expiry: drops its lease and puts
-- it in deferred (or nowhere when it is done, and then out of the domain's
-- messages).
-- KEYS: ready, deferred, leases, holders, messages, then (one server
--       only) the listings a finished message leaves whatever the filing
--       finds: the message index, the sender's messages
-- ARGV: id, holder ('' = nobody may hold it), next attempt ms ('' = done)
-- Returns {filed 1/0, 1 if the domain holds no work at all now}.
-- An id is in at most one of ready, deferred and leases (every script
-- that adds it to one takes it out of the others or checks they lack it),
-- so a delivery its holder files is only in leases; one nobody holds may
-- be in ready or deferred. Whether work is left is asked only when the
-- delivery is done (a retry leaves it in deferred), one set at a time,
-- the leases first: while one delivery finishes, others are most often
-- under way.
-- Complexity: O(log N).
for i = 6, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[1])
end
local holder = redis.call('HGET', KEYS[4], ARGV[1])
if ARGV[2] == '' then
  if holder then return {0, 0} end
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
elseif holder ~= ARGV[2] then
  return {0, 0}
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  return {1, 0}
end
redis.call('ZREM', KEYS[5], ARGV[1])
for _, key in ipairs({KEYS[3], KEYS[1], KEYS[2]}) do
  if redis.call('ZCARD', key) > 0 then return {1, 0} end
end
return {1, 1}
