-- wrk script: /bootstrap requests as iPXE sends them (bootstrap.ipxe), for
-- random hosts of a database written by gen-hosts.sh.
--   KS_HOSTS  number of hosts in the database
--   KS_KIND   "finished" (hosts i = 10k+1, read-only path) or
--             "install" (hosts i = 10k+10, state image1: a new bootid
--             is written on every request)
local hosts = tonumber(os.getenv("KS_HOSTS") or "1000")
local kind = os.getenv("KS_KIND") or "finished"
local threads = 0

function setup(thread)
    threads = threads + 1
    thread:set("tid", threads)
end

local function mac(oui, i)
    return string.format("%s-%02x-%02x-%02x", oui,
        math.floor(i / 65536) % 256, math.floor(i / 256) % 256, i % 256)
end

local function uuid(i)
    if i % 97 == 0 then
        return "00000000-0000-0000-0000-000000000000"
    end
    return string.format("%04x%04x-%04x-4%03x-8%03x-%012d",
        (i * 40503) % 65536, (i * 9973) % 65536, i % 65536, i % 4096, (i * 7) % 4096, i)
end

-- The query iPXE sends for host i.
local function query(i)
    local net1 = ""
    if i % 2 == 0 then net1 = mac("ac-1f-6b", i) end
    local serial = string.format("CZ%07dK", i)
    if i % 50 == 0 then serial = "To%20be%20filled%20by%20O.E.M." end
    return string.format(
        "?net0=%s&net1=%s&net2=&net3=&net4=&net5=&net6=&net7=&dhcp_mac=%s" ..
        "&serial=%s&uuid=%s&platform=efi&buildarch=x86_64&manufacturer=Supermicro&product=SYS-1029P-WTR",
        mac("0c-c4-7a", i), net1, mac("0c-c4-7a", i), serial, uuid(i))
end

-- The requests are made once per thread, before the run, so that the
-- generator costs wrk no more than a fixed request would: the path is
-- the URL's (/bootstrap, the no-op responder's, or a static file, which
-- nginx serves whatever the query), the hosts random ones of the kind.
local pool = {}
local next_req = 1
local POOL = 4096

function init(args)
    math.randomseed(7919 * (tid or 1))
    for n = 1, POOL do
        local k = math.random(0, math.floor(hosts / 10) - 1)
        local i = k * 10 + (kind == "install" and 10 or 1)
        pool[n] = wrk.format("GET", wrk.path .. query(i))
    end
end

function request()
    local r = pool[next_req]
    next_req = next_req % POOL + 1
    return r
end
