-- wrk script: 64 KiB range requests at random offsets of a file of
-- KS_SIZE bytes at path KS_PATH.
local size = tonumber(os.getenv("KS_SIZE") or "1073741824")
local path = os.getenv("KS_PATH") or "/images/bench/big.img"
local chunk = 65536
local threads = 0

function setup(thread)
    threads = threads + 1
    thread:set("tid", threads)
end

function init(args)
    math.randomseed(104729 * (tid or 1))
end

function request()
    local start = math.random(0, math.floor(size / chunk) - 1) * chunk
    return wrk.format("GET", path, { ["Range"] = string.format("bytes=%d-%d", start, start + chunk - 1) })
end
