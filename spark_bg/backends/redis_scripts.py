"""Lua scripts of the Redis backend; each one is a single atomic step on one queue.

Every script takes the keys of one queue (one hash tag, so one cluster slot) and reads the time
from the server with `TIME`, so due times and leases are judged by one clock. Times are in
milliseconds. The key layout, for queue `Q` under prefix `P`:

    P:{Q}:ready      list of jobs; new ones go on the left, workers take from the right. An
                     item is a job id, or "id NUL payload" for a job pushed with one LPUSH
                     whose payload the claim moves to the jobs hash
    P:{Q}:jobs       hash   id -> payload
    P:{Q}:delayed    zset   id -> due time
    P:{Q}:active     zset   id -> lease deadline
    P:{Q}:owner      hash   id -> worker id holding the lease
    P:{Q}:attempt    hash   id -> attempt number (absent means 1)
    P:{Q}:deliveries hash   id -> times handed out since pushed or last retried
    P:{Q}:inboxes    zset   worker id -> deadline of its inbox registration
    P:{Q}:inbox:W    list   items worker W took with BLMOVE and has not claimed yet
    P:{Q}:failed     zset   id -> time of failure in ms * 1000 + a counter
    P:{Q}:failinfo   hash   id -> JSON {"error": ..., "attempts": ...}
    P:{Q}:failseq    counter that orders failures within one millisecond
"""

from __future__ import annotations

# Order of KEYS shared by every script.
KEY_NAMES = (
    "ready",
    "jobs",
    "delayed",
    "active",
    "owner",
    "attempt",
    "deliveries",
    "inboxes",
    "failed",
    "failinfo",
    "failseq",
)

# How many of KEY_NAMES each script reads, from the first. Passing fewer keys makes each call
# cheaper to encode; a script touches only the keys it is given. CLAIM and RELEASE also take
# the worker's inbox as their last key.
KEYS_USED = {
    "PUSH": 3,
    "CLAIM": 8,
    "ACK": 7,
    "RETRY": 7,
    "RELEASE": 8,
    "RENEW": 5,
    "FAIL": 11,
    "RECOVER": 11,
    "RETRY_FAILED": 11,
    "DELETE_FAILED": 11,
    "COUNTS": 11,
}

_PRELUDE = """
local ready, jobs, delayed, active = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local owner, attempt, deliveries, inboxes = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local failed, failinfo, failseq = KEYS[9], KEYS[10], KEYS[11]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- Move up to `limit` due delayed jobs to the front of the ready list, earliest first.
local function promote_due(limit)
    local due = redis.call('ZRANGE', delayed, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)
    if #due == 0 then
        return 0
    end
    redis.call('ZREM', delayed, unpack(due))
    for i = #due, 1, -1 do
        redis.call('RPUSH', ready, due[i])
    end
    return #due
end

-- Forget everything about a job.
local function forget(id)
    redis.call('HDEL', jobs, id)
    redis.call('HDEL', owner, id)
    redis.call('HDEL', attempt, id)
    redis.call('HDEL', deliveries, id)
    redis.call('ZREM', active, id)
end

-- Drop failed jobs beyond the count and age bounds of the store.
local function trim_failed(max_count, max_age_ms)
    local stale = redis.call('ZRANGE', failed, '-inf', (now - max_age_ms) * 1000, 'BYSCORE')
    local excess = redis.call('ZCARD', failed) - #stale - max_count
    if excess > 0 then
        local oldest = redis.call('ZRANGE', failed, #stale, #stale + excess - 1)
        for _, id in ipairs(oldest) do
            stale[#stale + 1] = id
        end
    end
    for _, id in ipairs(stale) do
        forget(id)
        redis.call('ZREM', failed, id)
        redis.call('HDEL', failinfo, id)
    end
end

-- Move a job to the failed store; the caller checked who holds it.
local function move_to_failed(id, error, max_count, max_age_ms)
    local attempts = tonumber(redis.call('HGET', attempt, id) or '1')
    redis.call('ZREM', active, id)
    redis.call('HDEL', owner, id)
    redis.call('HDEL', deliveries, id)
    -- Score: time in ms times 1000 plus a counter, so failures in one ms keep their order.
    local seq = redis.call('INCR', failseq) % 1000
    redis.call('ZADD', failed, now * 1000 + seq, id)
    redis.call('HSET', failinfo, id, cjson.encode({error = error, attempts = attempts}))
    trim_failed(max_count, max_age_ms)
end
"""

# ARGV: groups of 4 (id, payload, kind, value). kind "n": ready now; "d": value is a delay in
# ms; "a": value is an absolute due time in ms. An id already stored is skipped. Jobs that are
# due now and need no such check skip this script: they go on the ready list with one LPUSH.
PUSH = (
    _PRELUDE
    + """
local added = 0
local now_ids = {}
for i = 1, #ARGV, 4 do
    local id = ARGV[i]
    if redis.call('HSETNX', jobs, id, ARGV[i + 1]) == 1 then
        local kind = ARGV[i + 2]
        if kind == 'n' then
            now_ids[#now_ids + 1] = id
            if #now_ids == 1000 then
                redis.call('LPUSH', ready, unpack(now_ids))
                now_ids = {}
            end
        elseif kind == 'd' then
            redis.call('ZADD', delayed, now + tonumber(ARGV[i + 3]), id)
        else
            redis.call('ZADD', delayed, tonumber(ARGV[i + 3]), id)
        end
        added = added + 1
    end
end
if #now_ids > 0 then
    redis.call('LPUSH', ready, unpack(now_ids))
end
return added
"""
)

# ARGV: worker id, count, lease ms, "1" to take items from the worker's inbox first, and the
# id of one inbox item to claim alone (or ""). Returns a flat list of (id, payload, attempt,
# deliveries), empty if every item taken was a resent copy, or, when nothing is ready, {ms
# until the next delayed job is due, or -1}.
CLAIM = (
    _PRELUDE
    + """
local worker, count, lease_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local take_inbox, adopt_id = ARGV[4], ARGV[5]
local inbox = KEYS[#KEYS]
-- While registered, the worker's inbox is its own; once the registration lapses, a sweep
-- returns what the inbox holds to the ready list.
redis.call('ZADD', inboxes, now + lease_ms, worker)
local items = false
if adopt_id ~= '' then
    -- Claim only the item of `adopt_id`, which the worker already started.
    local prefix = adopt_id .. '\0'
    for _, item in ipairs(redis.call('LRANGE', inbox, 0, -1)) do
        if string.sub(item, 1, #prefix) == prefix then
            redis.call('LREM', inbox, 1, item)
            items = {item}
            break
        end
    end
    if not items then
        return {}
    end
else
    promote_due(count)
    if take_inbox == '1' then
        items = redis.call('RPOP', inbox, count)
    end
    if items and #items < count then
        local more = redis.call('RPOP', ready, count - #items)
        if more then
            for _, item in ipairs(more) do
                items[#items + 1] = item
            end
        end
    elseif not items then
        items = redis.call('RPOP', ready, count)
    end
end
if not items then
    local next_due = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
    if #next_due == 0 then
        return {-1}
    end
    return {math.max(0, tonumber(next_due[2]) - now)}
end
local deadline = now + lease_ms
local out = {}
for _, item in ipairs(items) do
    local id, payload
    local nul = string.find(item, '\0', 1, true)
    if nul then
        id = string.sub(item, 1, nul - 1)
        payload = string.sub(item, nul + 1)
        -- A job already known under this id means this item is a resent copy: drop it.
        if redis.call('HSETNX', jobs, id, payload) == 0 then
            payload = nil
        end
    else
        id = item
        payload = redis.call('HGET', jobs, id)
    end
    if payload then
        redis.call('ZADD', active, deadline, id)
        redis.call('HSET', owner, id, worker)
        local handed = redis.call('HINCRBY', deliveries, id, 1)
        out[#out + 1] = id
        out[#out + 1] = payload
        out[#out + 1] = redis.call('HGET', attempt, id) or '1'
        out[#out + 1] = handed
    end
end
return out
"""
)

# ARGV: worker id, then job ids. Returns the ids the worker no longer held.
ACK = (
    _PRELUDE
    + """
local lost = {}
for i = 2, #ARGV do
    local id = ARGV[i]
    if redis.call('HGET', owner, id) == ARGV[1] then
        forget(id)
    else
        lost[#lost + 1] = id
    end
end
return lost
"""
)

# ARGV: worker id, job id, delay ms. Returns 1, or 0 if the worker no longer held the job.
RETRY = (
    _PRELUDE
    + """
local id = ARGV[2]
if redis.call('HGET', owner, id) ~= ARGV[1] then
    return 0
end
redis.call('ZREM', active, id)
redis.call('HDEL', owner, id)
redis.call('HDEL', deliveries, id)
redis.call('HSET', attempt, id, tonumber(redis.call('HGET', attempt, id) or '1') + 1)
redis.call('ZADD', delayed, now + tonumber(ARGV[3]), id)
return 1
"""
)

# ARGV: worker id, job id, error text, failed-store max count, max age ms.
FAIL = (
    _PRELUDE
    + """
local id = ARGV[2]
if redis.call('HGET', owner, id) ~= ARGV[1] then
    return 0
end
move_to_failed(id, ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
return 1
"""
)

# ARGV: worker id, then job ids. Jobs go back to the front; the delivery is not charged. The
# worker's inbox is emptied back into the ready list and its registration removed.
RELEASE = (
    _PRELUDE
    + """
for i = #ARGV, 2, -1 do
    local id = ARGV[i]
    if redis.call('HGET', owner, id) == ARGV[1] then
        redis.call('ZREM', active, id)
        redis.call('HDEL', owner, id)
        redis.call('HINCRBY', deliveries, id, -1)
        redis.call('RPUSH', ready, id)
    end
end
-- Items the worker took but never claimed go back as they are, oldest at the front.
local inbox = KEYS[#KEYS]
while redis.call('LMOVE', inbox, ready, 'LEFT', 'RIGHT') do
end
redis.call('ZREM', inboxes, ARGV[1])
return 1
"""
)

# ARGV: worker id, lease ms, then job ids. Returns the ids the worker no longer held.
RENEW = (
    _PRELUDE
    + """
local deadline = now + tonumber(ARGV[2])
local lost = {}
for i = 3, #ARGV do
    local id = ARGV[i]
    if redis.call('HGET', owner, id) == ARGV[1] then
        redis.call('ZADD', active, 'XX', deadline, id)
    else
        lost[#lost + 1] = id
    end
end
return lost
"""
)

# ARGV: max deliveries, failed-store max count, max age ms. Requeues jobs whose lease expired,
# fails those handed out max-deliveries times, promotes due delayed jobs. Returns moved ids.
RECOVER = (
    _PRELUDE
    + """
local max_deliveries = tonumber(ARGV[1])
local max_count, max_age_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local expired = redis.call('ZRANGE', active, '-inf', now, 'BYSCORE', 'LIMIT', 0, 1000)
for _, id in ipairs(expired) do
    local handed = tonumber(redis.call('HGET', deliveries, id) or '0')
    if handed >= max_deliveries then
        move_to_failed(id, 'delivered ' .. handed .. ' times without finishing; '
            .. 'the job may be crashing or stalling its worker', max_count, max_age_ms)
    else
        redis.call('ZREM', active, id)
        redis.call('HDEL', owner, id)
        redis.call('RPUSH', ready, id)
    end
end
-- Inboxes of workers whose registration lapsed: their items go back to the front, each
-- charged a delivery, since the worker may have started it before dying.
-- NOTE: the inbox key is built here rather than passed in KEYS. It shares the queue's hash
-- tag, so it lies in the same cluster slot, but Redis Cluster tooling cannot see the access.
local lapsed = redis.call('ZRANGE', inboxes, '-inf', now, 'BYSCORE', 'LIMIT', 0, 100)
local inbox_prefix = string.sub(inboxes, 1, #inboxes - #'inboxes') .. 'inbox:'
for _, dead in ipairs(lapsed) do
    local box = inbox_prefix .. dead
    local item = redis.call('RPOP', box)
    while item do
        local id = item
        local nul = string.find(item, '\0', 1, true)
        if nul then
            id = string.sub(item, 1, nul - 1)
            redis.call('HSETNX', jobs, id, string.sub(item, nul + 1))
        end
        if not redis.call('HGET', owner, id) then
            local handed = redis.call('HINCRBY', deliveries, id, 1)
            if handed >= max_deliveries then
                move_to_failed(id, 'delivered ' .. handed .. ' times without finishing; '
                    .. 'the job may be crashing or stalling its worker', max_count, max_age_ms)
            else
                redis.call('RPUSH', ready, id)
            end
            expired[#expired + 1] = id
        end
        item = redis.call('RPOP', box)
    end
    redis.call('ZREM', inboxes, dead)
end
promote_due(1000)
trim_failed(max_count, max_age_ms)
return expired
"""
)

# ARGV: "1" to take every failed job, else "0" followed by job ids. Returns the count moved.
RETRY_FAILED = (
    _PRELUDE
    + """
local ids = {}
if ARGV[1] == '1' then
    ids = redis.call('ZRANGE', failed, 0, -1)
else
    for i = 2, #ARGV do
        ids[#ids + 1] = ARGV[i]
    end
end
local moved = 0
for _, id in ipairs(ids) do
    if redis.call('ZREM', failed, id) == 1 then
        redis.call('HDEL', failinfo, id)
        redis.call('HDEL', attempt, id)
        redis.call('HDEL', deliveries, id)
        if redis.call('HEXISTS', jobs, id) == 1 then
            redis.call('LPUSH', ready, id)
            moved = moved + 1
        end
    end
end
return moved
"""
)

# ARGV: as RETRY_FAILED. Returns the count deleted.
DELETE_FAILED = (
    _PRELUDE
    + """
local ids = {}
if ARGV[1] == '1' then
    ids = redis.call('ZRANGE', failed, 0, -1)
else
    for i = 2, #ARGV do
        ids[#ids + 1] = ARGV[i]
    end
end
local deleted = 0
for _, id in ipairs(ids) do
    if redis.call('ZREM', failed, id) == 1 then
        redis.call('HDEL', failinfo, id)
        forget(id)
        deleted = deleted + 1
    end
end
return deleted
"""
)

# Returns {ready, delayed, active, failed}, due delayed jobs counted as ready.
COUNTS = (
    _PRELUDE
    + """
local due = redis.call('ZCOUNT', delayed, '-inf', now)
return {
    redis.call('LLEN', ready) + due,
    redis.call('ZCARD', delayed) - due,
    redis.call('ZCARD', active),
    redis.call('ZCARD', failed),
}
"""
)
