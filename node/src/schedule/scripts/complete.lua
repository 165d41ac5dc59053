-- Completes attempts, several at once, on one server: for each, the
-- record's compare-and-set (as write_record.lua) and, unless the record
-- changed meanwhile, the filing of the delivery (as file.lua), all in one
-- atomic call. Loaded behind file_many.lua, wrapped as a local function
-- of (KEYS, ARGV): file_many.
-- KEYS: per attempt, write_record's keys, then file's five domain keys,
--       then the listings a finished message leaves, then those a message
--       whose record is gone leaves
-- ARGV: how many attempts; per attempt, how many keys write_record takes,
--       how many arguments, how many listings of each kind, then
--       write_record's arguments and file's three arguments
-- Returns per attempt {1, current} when the record changed meanwhile
--       (nothing filed), else {0 gone / 2 written, filed 1/0, 1 if the
--       domain holds no work at all now}.
-- The same records and keys as running them one after another (only which
-- attempt says that its domain was left without work may differ: the
-- last in the call to finish a delivery there says it, or a delivery
-- that came twice, filed after the others), with fewer commands: the
-- records are read with one MGET and written with one MSET and one DEL at
-- the end (a table keeps what each record is after the attempts before),
-- and each domain's deliveries are filed together (file_many). A
-- delivery that comes twice is filed the second time on its own, after.
-- Complexity: O(n log N) for n attempts.
local n = tonumber(ARGV[1])
local attempts = {}
local k, a = 1, 2
for i = 1, n do
  local nkeys, nargs = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local ndone, ngone = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local t = {
    record = KEYS[k], body = KEYS[k + 1], reports = nkeys > 2 and KEYS[k + 2] or nil,
    expected = ARGV[a + 4], new = ARGV[a + 5], report_args = nargs > 2 and ARGV[a + 6] or nil,
    domain = {}, done = {}, gone = {},
  }
  for j = 1, 5 do t.domain[j] = KEYS[k + nkeys + j - 1] end
  for j = 1, ndone do t.done[j] = KEYS[k + nkeys + 4 + j] end
  for j = 1, ngone do t.gone[j] = KEYS[k + nkeys + 4 + ndone + j] end
  local f = a + 4 + nargs
  t.id, t.holder, t.next = ARGV[f], ARGV[f + 1], ARGV[f + 2]
  attempts[i] = t
  k = k + nkeys + 5 + ndone + ngone
  a = f + 3
end

-- The records, in order.
local keys, current, touched = {}, {}, {}
for i, t in ipairs(attempts) do keys[i] = t.record end
local fetched = redis.call('MGET', unpack(keys))
for i, key in ipairs(keys) do
  if current[key] == nil then current[key] = fetched[i] end
end
local results = {}
for i, t in ipairs(attempts) do
  local now = current[t.record]
  if not now then
    t.code = 0
  elseif now ~= t.expected then
    t.code = 1
    results[i] = {1, now}
  else
    t.code = 2
    if t.new == '' then current[t.record] = false else current[t.record] = t.new end
    if not touched[t.record] then
      touched[t.record] = t.body
      touched[#touched + 1] = t.record
    end
    if t.reports then redis.call('SET', t.reports, t.report_args) end
  end
end
local sets, dels = {}, {}
for _, key in ipairs(touched) do
  if current[key] then
    sets[#sets + 1] = key
    sets[#sets + 1] = current[key]
  else
    dels[#dels + 1] = key
    dels[#dels + 1] = touched[key]
  end
end
if #sets > 0 then redis.call('MSET', unpack(sets)) end
if #dels > 0 then redis.call('DEL', unpack(dels)) end

-- The filings, a domain at a time; the listings each attempt leaves.
local domains, later, forget = {}, {}, {}
local function forget_in(keys, id)
  for _, key in ipairs(keys) do
    if not forget[key] then
      forget[key] = {}
      forget[#forget + 1] = key
    end
    table.insert(forget[key], id)
  end
end
for i, t in ipairs(attempts) do
  if t.code ~= 1 then
    local name = t.domain[1]
    local d = domains[name]
    if not d then
      d = {keys = t.domain, attempts = {}, seen = {}}
      domains[name] = d
      domains[#domains + 1] = d
    end
    if d.seen[t.id] then
      later[#later + 1] = i
    else
      d.seen[t.id] = true
      table.insert(d.attempts, i)
      if t.code == 2 then forget_in(t.done, t.id) else forget_in(t.gone, t.id) end
    end
  end
end
for _, d in ipairs(domains) do
  local args = {}
  for _, i in ipairs(d.attempts) do
    local t = attempts[i]
    args[#args + 1] = t.id
    args[#args + 1] = t.holder
    args[#args + 1] = t.next
  end
  local filed = file_many(d.keys, args)
  for j, i in ipairs(d.attempts) do
    results[i] = {attempts[i].code, filed[j][1], filed[j][2]}
  end
end
for _, key in ipairs(forget) do redis.call('ZREM', key, unpack(forget[key])) end

-- A delivery that came twice: filed again, as it would be after the first.
for _, i in ipairs(later) do
  local t = attempts[i]
  for _, key in ipairs(t.code == 2 and t.done or t.gone) do redis.call('ZREM', key, t.id) end
  local filed = file_many(t.domain, {t.id, t.holder, t.next})[1]
  results[i] = {t.code, filed[1], filed[2]}
end
return results
