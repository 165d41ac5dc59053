-- Files new deliveries unless they are already queued (ready, deferred or
-- leased): due ones at the back of ready, the others in deferred. Every id
-- is listed in the domain's messages, queued already or not (a rescan
-- lists what an earlier release queued).
-- KEYS: ready, deferred, leases, suspended, messages
-- ARGV: channel, news, fresh 1/0, (id, next attempt ms, due 1/0)...
-- Fresh: the messages were just stored by this release, so no earlier
-- release queued them. Every id this release queues in a domain is
-- listed in its messages; so when the listing adds every id of a chunk,
-- none of them is queued, and their places are not asked. (A rescan is
-- not fresh: it can meet ids an earlier release queued unlisted.)
-- Publishes `news` on `channel` (unless it is '') when ready was empty and
-- now has work, and the domain is not suspended: the other nodes hear of
-- the domain at once (see `news.rs`).
-- A refusal (an ACL user without the channel) is ignored: news only
-- hurries the other nodes, the work is filed all the same.
-- Returns {suspended 1/0, timer}: timer is the domain's next timer ms (the
-- earliest of its next deferred attempt and its next lease expiry) when
-- an id was already deferred or leased (a rescan: the caller puts the
-- timer back in case it was lost), else -1.
-- Every command takes a chunk of ids at once (`ZMSCORE`, a `ZADD` of
-- many), so the commands a call runs do not grow with the ids; a chunk
-- stays well within what Lua's `unpack` can pass.
-- Complexity: O(n log N) for n ids.
local CHUNK = 1000
local score = nil
local queued = false
local woke = false
for first = 4, #ARGV, 3 * CHUNK do
  local last = math.min(#ARGV, first + 3 * CHUNK - 1)
  local ids, listed = {}, {}
  for i = first, last, 3 do
    ids[#ids + 1] = ARGV[i]
    listed[#listed + 1] = 0
    listed[#listed + 1] = ARGV[i]
  end
  local added = redis.call('ZADD', KEYS[5], unpack(listed))
  local leased, deferred, ready = {}, {}, {}
  if ARGV[3] ~= '1' or added < #ids then
    leased = redis.call('ZMSCORE', KEYS[3], unpack(ids))
    deferred = redis.call('ZMSCORE', KEYS[2], unpack(ids))
    ready = redis.call('ZMSCORE', KEYS[1], unpack(ids))
  end
  local to_ready, to_deferred = {}, {}
  for n, id in ipairs(ids) do
    local i = first + 3 * (n - 1)
    if leased[n] or deferred[n] then
      queued = true
    elseif not ready[n] then
      if ARGV[i + 2] == '1' then
        if score == nil then
          local back = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
          score = 0
          if #back > 0 then score = tonumber(back[2]) + 1 else woke = true end
        end
        to_ready[#to_ready + 1] = score
        to_ready[#to_ready + 1] = id
        score = score + 1
      else
        to_deferred[#to_deferred + 1] = ARGV[i + 1]
        to_deferred[#to_deferred + 1] = id
      end
    end
  end
  if #to_ready > 0 then redis.call('ZADD', KEYS[1], unpack(to_ready)) end
  if #to_deferred > 0 then redis.call('ZADD', KEYS[2], unpack(to_deferred)) end
end
local timer = -1
if queued then
  for _, key in ipairs({KEYS[2], KEYS[3]}) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #first > 0 and (timer < 0 or tonumber(first[2]) < timer) then timer = tonumber(first[2]) end
  end
end
local suspended = redis.call('EXISTS', KEYS[4])
if woke and suspended == 0 and ARGV[1] ~= '' then redis.pcall('PUBLISH', ARGV[1], ARGV[2]) end
return {suspended, timer}
