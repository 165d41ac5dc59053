-- Takes at most ARGV[2] entries due by ARGV[1], earliest first, and leases
-- each until ARGV[3] (its score becomes the lease's end). Returns name,
-- entry, name, entry, ...; a name without an entry is dropped.
-- KEYS: due (sorted set), entries (hash)
-- ARGV: now ms, max, lease end ms
local names = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, name in ipairs(names) do
  local entry = redis.call('HGET', KEYS[2], name)
  if entry then
    redis.call('ZADD', KEYS[1], ARGV[3], name)
    out[#out + 1] = name
    out[#out + 1] = entry
  else
    redis.call('ZREM', KEYS[1], name)
  end
end
return out
