-- Puts a message set aside by quarantine.lua back: its record and body
-- out of the quarantine hash into their keys, once the record reads again
-- (after an upgrade). The caller has decoded the record and added its
-- index entry first.
-- KEYS: record, body, quarantined
-- ARGV: the record as it was read from the hash (compared, so that a
--       hash written again meanwhile is not restored half)
-- Returns 1 restored, 0 nothing set aside (or changed meanwhile), 2 a
-- record is already in place (the hash is left for the operator).
-- Complexity: O(1) (plus the size of the values copied).
if redis.call('EXISTS', KEYS[1]) == 1 then return 2 end
local record = redis.call('HGET', KEYS[3], 'record')
if not record or record ~= ARGV[1] then return 0 end
local body = redis.call('HGET', KEYS[3], 'body') or ''
redis.call('SET', KEYS[1], record)
redis.call('SET', KEYS[2], body)
redis.call('DEL', KEYS[3])
return 1
