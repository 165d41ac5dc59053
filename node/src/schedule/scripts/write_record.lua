-- Compare-and-set of a message record: written only if it is still the
-- record the change was computed from.
-- KEYS: record, body
-- ARGV: expected record, new record ('' = the message is done), body grace ms
-- Returns {0} no record, {1, current} changed meanwhile, {2} written.
-- Complexity: O(1).
local current = redis.call('GET', KEYS[1])
if not current then return {0} end
if current ~= ARGV[1] then return {1, current} end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return {2}
