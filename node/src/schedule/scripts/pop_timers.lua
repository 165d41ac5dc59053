-- Takes the domains whose timer is due out of the timers, for the caller
-- to look at: it runs the domain scripts and adds each domain back with
-- the timer they answer (ZADD LT, which also keeps an earlier timer that
-- a writer added meanwhile).
-- KEYS: timers
-- ARGV: now ms, limit
-- Returns {domain, timer ms, ...}.
-- Complexity: O((k + 1) log D) for k domains taken, D domains with timers.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
for i = 1, #due, 2 do redis.call('ZREM', KEYS[1], due[i]) end
return due
