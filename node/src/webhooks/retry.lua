-- Puts back entries whose post failed: due at ARGV[1], each with its new
-- count of failures (the entry as JSON). An entry another node posted and
-- removed meanwhile stays removed.
-- KEYS: due (sorted set), entries (hash)
-- ARGV: due ms, then name, entry, name, entry, ...
for i = 2, #ARGV, 2 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
return 0
