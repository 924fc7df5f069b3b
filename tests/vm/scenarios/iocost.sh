# What an append's I/O pattern costs on the guest's cache disk (not part of the default
# run): tests/vm/run.sh iocost. O_DIRECT writes of 128 KiB (an append's lines) and
# 8 KiB (a header copy) to /dev/vdb, serial, from two threads, or in one Linux AIO
# submission, with and without an fdatasync after; and an fdatasync with nothing
# written. Prints the median and mean time of each pattern over LC_BENCH_ROUNDS x 50
# rounds (default 150), twice (iocost.txt in the results). Writes the SSD's first
# 512 MiB: run it alone.
source /payload/scenarios/lib.sh
N=$(( ${LC_BENCH_ROUNDS:-3} * 50 ))
cat >/tmp/iocost.py <<'PYEOF'
# Timed I/O patterns of an append (tests/vm/scenarios/iocost.sh).
import os, mmap, time, threading, ctypes, statistics, sys, queue
dev = sys.argv[1]; N = int(sys.argv[2]) if len(sys.argv) > 2 else 200
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
big = mmap.mmap(-1, 128 << 10); big.write(b"\xab" * (128 << 10))
hdr = mmap.mmap(-1, 8 << 10); hdr.write(b"\xcd" * (8 << 10))
slot = [0]
def nxt():
    slot[0] = (slot[0] + 1) % 400
    return (64 << 20) + slot[0] * (1 << 20)
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
class Iocb(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_uint32),
                ("opcode", ctypes.c_uint16), ("prio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("res2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]
class Ev(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]
ctx = ctypes.c_ulong(0)
assert libc.syscall(206, 8, ctypes.byref(ctx)) == 0
def addr(m):
    return ctypes.addressof(ctypes.c_char.from_buffer(m))
abig, ahdr = addr(big), addr(hdr)
def aio(ops):  # ops: list of (addr, len, off, opcode) ; 1 = PWRITE, 3 = FDSYNC
    cbs = (Iocb * len(ops))()
    ptrs = (ctypes.c_void_p * len(ops))()
    for i, (a, l, o, op) in enumerate(ops):
        cbs[i].opcode = op; cbs[i].fildes = fd; cbs[i].buf = a; cbs[i].nbytes = l; cbs[i].offset = o
        ptrs[i] = ctypes.addressof(cbs[i])
    r = libc.syscall(209, ctx, len(ops), ptrs)
    assert r == len(ops), (r, ctypes.get_errno())
    evs = (Ev * len(ops))()
    got = 0
    while got < len(ops):
        r = libc.syscall(208, ctx, 1, len(ops) - got, ctypes.byref(evs, got * ctypes.sizeof(Ev)), None)
        assert r > 0, (r, ctypes.get_errno())
        got += r
    for e in evs[:got]:
        assert e.res >= 0, e.res
jobs = queue.Queue(); done = queue.Queue()
def helper():
    while True:
        off = jobs.get()
        os.pwrite(fd, hdr, off); done.put(1)
threading.Thread(target=helper, daemon=True).start()
def A():
    o = nxt(); os.pwrite(fd, big, o + 8192); os.pwrite(fd, hdr, o); os.fdatasync(fd)
def B():
    o = nxt(); jobs.put(o); os.pwrite(fd, big, o + 8192); done.get(); os.fdatasync(fd)
def C():
    o = nxt(); os.pwrite(fd, hdr, o); os.fdatasync(fd)
def D():
    os.fdatasync(fd)
def E():
    o = nxt(); aio([(abig, 128 << 10, o + 8192, 1), (ahdr, 8192, o, 1)]); os.fdatasync(fd)
def F():
    o = nxt(); os.pwrite(fd, big, o + 8192); os.pwrite(fd, hdr, o)
def G():
    o = nxt(); aio([(abig, 128 << 10, o + 8192, 1), (ahdr, 8192, o, 1)])
def H():
    o = nxt(); os.pwrite(fd, big, o + 8192)
def I():
    o = nxt(); os.pwrite(fd, hdr, o)
names = {"A serial w128+w8+fsync": A, "B thread w128||w8 +fsync": B, "C w8+fsync": C, "D fsync only": D,
         "E aio w128||w8 +fsync": E, "F serial w128+w8": F, "G aio w128||w8": G, "H w128": H, "I w8": I}
res = {k: [] for k in names}
for rnd in range(N):
    for k, f in names.items():
        t = time.perf_counter(); f(); res[k].append((time.perf_counter() - t) * 1e6)
for k, v in res.items():
    v = v[5:]
    print(f"{k:28s} median {statistics.median(v):7.0f} us  mean {statistics.mean(v):7.0f} us")
PYEOF
out=/payload/results/iocost.txt
python3 /tmp/iocost.py /dev/vdb "$N" >"$out" 2>&1 || { cat "$out"; fail "iocost"; }
python3 /tmp/iocost.py /dev/vdb "$N" >>"$out" 2>&1 || { cat "$out"; fail "iocost"; }
cat "$out"
