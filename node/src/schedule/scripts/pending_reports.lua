-- Takes the entries of reports kept with a record and not queued since
-- `cutoff` for one pass that queues them: each moves to `now`, so that
-- another pass (another node) leaves it alone for a grace.
-- KEYS: pending reports (ZSET of '<message id>:<report id>' by ms)
-- ARGV: cutoff ms, now ms, most entries
-- Returns the entries taken.
-- Complexity: O(log N + most entries).
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, entry in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[2], entry)
end
return due
