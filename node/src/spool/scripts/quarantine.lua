-- Sets an unreadable message aside: its record and body move into one hash
-- with the reason and the time, so that nothing reads them again.
-- KEYS: record, body, quarantined
-- ARGV: the unreadable record as read (compared, so that a record written
--       again meanwhile is not taken), reason, now ms
-- Returns 1 moved, 2 already set aside, 0 the record changed or is gone.
-- Complexity: O(1) (plus the size of the values copied).
local current = redis.call('GET', KEYS[1])
if not current then
  if redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
  return 0
end
if current ~= ARGV[1] then return 0 end
local body = redis.call('GET', KEYS[2]) or ''
redis.call('HSET', KEYS[3], 'record', current, 'body', body, 'reason', ARGV[2], 'at', ARGV[3])
redis.call('DEL', KEYS[1], KEYS[2])
return 1
