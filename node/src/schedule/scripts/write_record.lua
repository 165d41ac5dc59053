-- Compare-and-set of a message record: written only if it is still the
-- record the change was computed from; with it, atomically, the reports
-- that the change calls for (kept until they are queued).
-- KEYS: record, body, reports (optional; same slot)
-- ARGV: expected record, new record ('' = the message is done: its body
--       goes with it), reports (with KEYS[3])
-- Returns {0} no record, {1, current} changed meanwhile, {2} written.
-- Complexity: O(1).
local current = redis.call('GET', KEYS[1])
if not current then return {0} end
if current ~= ARGV[1] then return {1, current} end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1], KEYS[2])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
if KEYS[3] then
  redis.call('SET', KEYS[3], ARGV[3])
end
return {2}
