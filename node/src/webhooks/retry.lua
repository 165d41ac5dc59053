-- Puts back an entry whose post failed: due at ARGV[2], with its new
-- count of failures (ARGV[3], the entry as JSON). An entry another node
-- posted and removed meanwhile stays removed.
-- KEYS: due (sorted set), entries (hash)
-- ARGV: name, due ms, entry
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
  return 1
end
return 0
