-- Puts a body written in parts (SET, then APPENDs, under a staging key
-- that expires) in place with its message's record, in one step, and
-- only if every part arrived: a record is never stored without its body.
-- KEYS: staging, body, record (one slot)
-- ARGV: the staged body's length in bytes, the record
-- Returns 1, or an error (nothing written) when the staged body is not
-- whole (it expired, or a part was lost).
-- Complexity: O(1).
if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return redis.error_reply('INCOMPLETE the staged body is not whole')
end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('PERSIST', KEYS[2])
redis.call('SET', KEYS[3], ARGV[2])
return 1
