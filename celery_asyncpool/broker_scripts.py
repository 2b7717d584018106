"""The server-side scripts of the Redis broker transport (``celery_asyncpool.broker``).

``FETCH`` takes up to ``count`` waiting messages and records each in kombu's
unacked hash and index in the same atomic step, so no message is ever out of
both the queue and the unacked hash. It keeps kombu's order: the priority
steps first; within one step the queues in the consumer's cycle order, one
message from each in turn, so a batch interleaves the queues instead of
draining the first. A message the client already popped (the blocking wake-up,
see the transport's docstring) is recorded first.

Each payload is decoded only to read its delivery tag, exchange and routing
key, inside ``pcall``; the stored value is built by concatenation around the
payload's own text, as kombu's ``json.dumps([payload, exchange, routing_key])``
would, because re-encoding through cjson changes ``[]`` into ``{}`` and large
integers into floats. A payload that does not decode, or lacks those fields,
goes to its queue's dead-letter list and is returned for the log; it counts
against ``count``, so a queue full of them cannot hold the server for long.

KEYS: the unacked hash, the unacked index, then ``nq`` queue keys per
priority step, then ``nq`` dead-letter lists (one per queue, same order).
ARGV: count, the index score (the client's ``time()``: kombu's restore compares
it with the client's clock), ``nq``, and, for a popped message, the index of
its key in KEYS and its payload.

Returns ``{taken, dead}``: ``taken`` holds (key index, payload, tag) triples;
``dead`` (key index, dead-letter key) pairs.

``ACK`` removes acknowledged deliveries from the unacked hash and index, but
only where the index still holds the score this worker recorded: a copy
restored after ``visibility_timeout`` and fetched again by another worker has
the same delivery tag and a new score, and a late ack from the first worker
must not remove the second one's record. An empty score removes the entry
unconditionally (a delivery recorded by kombu's own ``QoS.append``).
KEYS: the unacked hash and index; ARGV: tag, score pairs.
"""

from __future__ import annotations

FETCH = """
local count = tonumber(ARGV[1])
local score = ARGV[2]
local nq = tonumber(ARGV[3])
local nkeys = #KEYS - 2 - nq
local taken, dead = {}, {}

local function field(message, ...)
    local value = message
    for _, name in ipairs({...}) do
        if type(value) ~= 'table' then return nil end
        value = value[name]
    end
    return value
end

local function record(index, payload)
    count = count - 1
    local ok, message = pcall(cjson.decode, payload)
    local tag = ok and field(message, 'properties', 'delivery_tag')
    local exchange = ok and field(message, 'properties', 'delivery_info', 'exchange')
    local routing_key = ok and field(message, 'properties', 'delivery_info', 'routing_key')
    if type(tag) ~= 'string' or type(exchange) ~= 'string' or type(routing_key) ~= 'string' then
        local dead_key = KEYS[2 + nkeys + ((index - 3) % nq) + 1]
        redis.call('LPUSH', dead_key, payload)
        dead[#dead + 1] = index
        dead[#dead + 1] = dead_key
        return
    end
    redis.call('HSET', KEYS[1], tag, '[' .. payload .. ',' .. cjson.encode(exchange) .. ','
               .. cjson.encode(routing_key) .. ']')
    redis.call('ZADD', KEYS[2], score, tag)
    taken[#taken + 1] = index
    taken[#taken + 1] = payload
    taken[#taken + 1] = tag
end

if ARGV[4] then
    record(tonumber(ARGV[4]), ARGV[5])
end
for step = 0, nkeys / nq - 1 do
    local open = {}
    for q = 1, nq do open[q] = true end
    local more = true
    while count > 0 and more do
        more = false
        for q = 1, nq do
            if count <= 0 then break end
            if open[q] then
                local index = 2 + step * nq + q
                local payload = redis.call('RPOP', KEYS[index])
                if payload then
                    more = true
                    record(index, payload)
                else
                    open[q] = false
                end
            end
        end
    end
    if count <= 0 then break end
end
return {taken, dead}
"""

ACK = """
local removed = 0
for i = 1, #ARGV, 2 do
    local tag, score = ARGV[i], ARGV[i + 1]
    local stored = redis.call('ZSCORE', KEYS[2], tag)
    if score == '' or (stored and tonumber(stored) == tonumber(score)) then
        redis.call('ZREM', KEYS[2], tag)
        redis.call('HDEL', KEYS[1], tag)
        removed = removed + 1
    end
end
return removed
"""
