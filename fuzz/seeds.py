#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/seed-*), from the shapes
the unit tests use. Run from anywhere; safe to re-run (seeds are overwritten, found inputs are
kept). The virtio seeds follow the layout of fuzz/src/lib.rs: control bytes, then guest memory
from address 0 with queue q's descriptor table at q*0x400, its available ring at +0x100, its
used ring at +0x200, and buffers from 0x1000."""
import gzip, io, json, os, struct, tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
ZERO_DIGEST = "sha256:" + "0" * 64
A_DIGEST = "sha256:" + "a" * 64


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# ---- virtio: guest memory images -------------------------------------------------------
NEXT, WRITE = 1, 2


class Mem:
    def __init__(self):
        self.b = bytearray(0x1000)
        self.next_buf = 0x1000
        self.avail = {}
        self.free = {}

    def ensure(self, end):
        if len(self.b) < end:
            self.b.extend(b"\0" * (end - len(self.b)))

    def buf(self, data=b"", length=None):
        addr = self.next_buf
        length = len(data) if length is None else length
        self.ensure(addr + max(length, len(data)))
        self.b[addr:addr + len(data)] = data
        self.next_buf = (addr + length + 15) & ~15
        return addr, length

    def chain(self, q, bufs):
        """bufs: (addr, len, writable); makes the chain available on queue q."""
        base = q * 0x400
        first = self.free.get(q, 0)
        for i, (addr, length, w) in enumerate(bufs):
            idx = first + i
            flags = (WRITE if w else 0) | (NEXT if i + 1 < len(bufs) else 0)
            struct.pack_into("<QIHH", self.b, base + 16 * idx, addr, length, flags,
                             idx + 1 if i + 1 < len(bufs) else 0)
        self.free[q] = first + len(bufs)
        n = self.avail.get(q, 0)
        struct.pack_into("<H", self.b, base + 0x100 + 4 + 2 * (n % 16), first)
        self.avail[q] = n + 1
        struct.pack_into("<H", self.b, base + 0x100 + 2, n + 1)

    def image(self):
        return bytes(self.b)


def blk_seeds():
    for name, rtype, sector, datalen, write in [
        ("in", 0, 1, 512, True), ("out", 1, 2, 1024, False), ("flush", 4, 0, 0, False),
        ("get-id", 8, 0, 20, True), ("beyond-end", 0, 63, 1024, True), ("unsupported", 99, 0, 0, False)]:
        m = Mem()
        h = m.buf(struct.pack("<IIQ", rtype, 0, sector))
        chain = [(h[0], 16, False)]
        if datalen:
            d = m.buf(b"\x11" * (0 if write else datalen), datalen)
            chain.append((d[0], datalen, write))
        s = m.buf(b"\xaa")
        chain.append((s[0], 1, True))
        m.chain(0, chain)
        put("virtio_blk", name, bytes([0, 0]) + m.image())
    # an indirect table: one descriptor (flag 4) pointing at a table of three
    m = Mem()
    h = m.buf(struct.pack("<IIQ", 0, 0, 0))
    d = m.buf(b"", 512)
    s = m.buf(b"\xaa")
    table = m.buf(struct.pack("<QIHH", h[0], 16, NEXT, 1) + struct.pack("<QIHH", d[0], 512, NEXT | WRITE, 2)
                  + struct.pack("<QIHH", s[0], 1, WRITE, 0))
    struct.pack_into("<QIHH", m.b, 0, table[0], 48, 4, 0)
    struct.pack_into("<HH", m.b, 0x100, 0, 1)
    put("virtio_blk", "indirect", bytes([0, 0]) + m.image())


def vsock_hdr(src_port, dst_port, op, length=0, buf_alloc=262144, fwd=0, flags=0, src_cid=3, dst_cid=2):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, length, 1, op, flags, buf_alloc, fwd)


def vsock_seeds():
    REQUEST, RESPONSE, RST, SHUTDOWN, RW, CUPD, CREQ = 1, 2, 3, 4, 5, 6, 7
    for name, pkts, host in [
        ("guest-connect-rw", [(REQUEST, b""), (RW, b"hello"), (CREQ, b""), (SHUTDOWN, b"")], b""),
        ("guest-connect-refused", [(REQUEST, b"")], b""),
        ("host-connect", [], b"CONNECT 9000\n"),
        ("host-connect-payload", [(RESPONSE, b"")], b"CONNECT 1024\nPOST / HTTP/1.1\r\n\r\n"),
        ("host-connect-bad", [], b"CONNECT x\n"),
    ]:
        m = Mem()
        # rx buffers for the device's replies
        for _ in range(4):
            r = m.buf(b"", 44 + 256)
            m.chain(0, [(r[0], r[1], True)])
        for op, payload in pkts:
            dst = 1234 if "refused" not in name else 4321
            if op == RESPONSE:
                h = m.buf(vsock_hdr(1024, 1 << 30, op))
            else:
                h = m.buf(vsock_hdr(50000, dst, op, len(payload), flags=3 if op == SHUTDOWN else 0))
            chain = [(h[0], 44, False)]
            if payload:
                p = m.buf(payload)
                chain.append((p[0], len(payload), False))
            m.chain(1, chain)
        flags = (1 if host else 0) | 2
        put("virtio_vsock", name, bytes([flags, len(host)]) + host + m.image())


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff


def tcp_frame(flags, seq=1000, ack=0, v6=False, src_port=40000, dst_port=80):
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x66\x6e\x76\x6d\x00" + (b"\x86\xdd" if v6 else b"\x08\x00")
    tcp = struct.pack("!HHIIBBHHH", src_port, dst_port, seq, ack, 5 << 4, flags, 65535, 0, 0)
    if v6:
        src, dst = b"\xfd" + b"\0" * 14 + b"\x02", b"\xfd" + b"\0" * 14 + b"\x01"
        ip = struct.pack("!IHBB", 6 << 28, len(tcp), 6, 64) + src + dst
        pseudo = src + dst + struct.pack("!IxxxB", len(tcp), 6)
    else:
        src, dst = bytes([10, 0, 2, 15]), bytes([93, 184, 216, 34])
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    c = csum(pseudo + tcp)
    tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
    return eth + ip + tcp


def reply_of(syn_frame, flags, v6=False):
    """passt's answer for the flow of a guest SYN: addresses and ports swapped."""
    f = tcp_frame(flags, seq=0, ack=0, v6=v6, src_port=80, dst_port=40000)
    return f


def net_seeds():
    SYN, RST, ACK = 2, 4, 16
    for v6 in (False, True):
        syn = tcp_frame(SYN, v6=v6)
        rst = reply_of(syn, RST, v6=v6)
        tag = "v6" if v6 else "v4"
        put("net_handshake", "syn-rst-" + tag, bytes([0, len(syn)]) + syn + bytes([1, len(rst)]) + rst)
        rstack = reply_of(syn, RST | ACK, v6=v6)
        put("net_handshake", "syn-rstack-" + tag, bytes([0, len(syn)]) + syn + bytes([1, len(rstack)]) + rstack)
        # the device: the guest sends the SYN (with a virtio-net header), passt answers RST
        m = Mem()
        for _ in range(2):
            r = m.buf(b"", 2048)
            m.chain(0, [(r[0], r[1], True)])
        hdr = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0)
        h = m.buf(hdr + syn)
        m.chain(1, [(h[0], h[1], False)])
        passt = struct.pack("!I", len(rst)) + rst
        put("virtio_net", "syn-rst-" + tag, bytes([1]) + struct.pack("<H", len(passt)) + passt + m.image())
    # a partial checksum to complete (NEEDS_CSUM, csum_start 34, csum_offset 16), header and
    # frame in two descriptors
    m = Mem()
    frame = tcp_frame(ACK | 8)
    h = m.buf(struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 16, 0))
    f = m.buf(frame + b"payload")
    m.chain(1, [(h[0], h[1], False), (f[0], f[1], False)])
    put("virtio_net", "needs-csum", bytes([0, 0, 0]) + m.image())


# ---- the layer unpacker ------------------------------------------------------------------

def tar_bytes(entries, fmt=tarfile.GNU_FORMAT):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as t:
        for e in entries:
            kind, name = e[0], e[1]
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            data = None
            if kind == "file":
                data = e[2]
                info.size = len(data)
                info.mode = 0o644
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
            elif kind == "sym":
                info.type = tarfile.SYMTYPE
                info.linkname = e[2]
            elif kind == "link":
                info.type = tarfile.LNKTYPE
                info.linkname = e[2]
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif kind == "chr":
                info.type = tarfile.CHRTYPE
                info.devmajor, info.devminor = 1, 3
            if len(e) > 3:
                info.pax_headers = e[3]
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def layers(first, second, kind=0):
    return bytes([kind]) + struct.pack("<H", len(first)) + first + second


def unpack_seeds():
    base = tar_bytes([("dir", "etc"), ("file", "etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
                      ("dir", "usr/bin"), ("file", "usr/bin/app", b"#!/bin/sh\necho hi\n"),
                      ("sym", "bin", "usr/bin"), ("link", "usr/bin/app2", "usr/bin/app"),
                      ("fifo", "run/fifo"), ("chr", "dev/null")])
    whiteouts = tar_bytes([("file", "etc/.wh.passwd", b""), ("dir", "usr"), ("file", "usr/.wh..wh..opq", b""),
                           ("file", "usr/new", b"new")])
    put("layer_unpack", "base-then-whiteouts", layers(base, whiteouts))
    escape = tar_bytes([("sym", "etc", "../outside"), ("file", "etc/x", b"escaped?")])
    put("layer_unpack", "symlink-escape", layers(escape, b""))
    abs_escape = tar_bytes([("sym", "up", "/"), ("file", "up/tmp/fnvm-fuzz-escape", b"escaped?")])
    put("layer_unpack", "absolute-symlink", layers(abs_escape, b""))
    dotdot = tar_bytes([("file", "../outside/keep", b"overwritten?")])
    put("layer_unpack", "dotdot", layers(dotdot, b""))
    link_out = tar_bytes([("sym", "s", "../outside/keep"), ("link", "h", "s"), ("file", "s", b"through?")])
    put("layer_unpack", "links-out", layers(link_out, b""))
    pax = tar_bytes([("file", "a/very/" + "long/" * 30 + "name", b"x",
                      {"SCHILY.xattr.user.test": "v", "uid": "1000", "gid": "1000", "mtime": "1.5"})],
                    fmt=tarfile.PAX_FORMAT)
    put("layer_unpack", "pax", layers(pax, tar_bytes([("file", ".wh.a", b"")])))
    put("layer_unpack", "gzip", layers(gzip.compress(base, mtime=0), gzip.compress(whiteouts, mtime=0), kind=1))


# ---- JSON and string parsers -------------------------------------------------------------

def json_seeds():
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": A_DIGEST, "size": 100,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": ZERO_DIGEST, "size": 100,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}]}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": A_DIGEST, "size": 1000},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ZERO_DIGEST, "size": 5000}]}
    config = {"architecture": "amd64", "os": "linux", "config": {"Entrypoint": ["/bin/app"], "Cmd": ["--port", "9000"],
              "Env": ["A=1"], "WorkingDir": "/srv", "User": "1000", "ExposedPorts": {"9000/tcp": {}},
              "Labels": {"a": "b"}, "StopSignal": "SIGTERM"}, "rootfs": {"type": "layers", "diff_ids": []}}
    put("image_manifest", "oci-index", bytes([0]) + json.dumps(index).encode())
    put("image_manifest", "docker-manifest", bytes([3]) + json.dumps(manifest).encode())
    put("image_manifest", "sniffed-index", bytes([4]) + json.dumps({"manifests": index["manifests"]}).encode())
    put("image_manifest", "schema1", bytes([5]) + b'{"schemaVersion":1,"name":"x"}')
    put("image_manifest", "config", bytes([1]) + json.dumps(config).encode())

    for i, r in enumerate(["registry.example.com/team/app:1.0", "localhost:5000/app@" + A_DIGEST,
                           "example.com/a/b:t@" + ZERO_DIGEST, "docker.io/library/alpine:3",
                           "oci:/tmp/layout:v1", "docker-archive:/tmp/img.tar", "[::1]:5000/x:y",
                           "example.com/a__b-c.d:_x", "alpine:3", "example.com:99999/app:1"]):
        put("image_reference", str(i), r)

    auth = {"auths": {"https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
                      "registry.example.com:5000": {"username": "u", "password": "p"}}}
    put("registry_auth", "auth-file", bytes([0]) + json.dumps(auth).encode())
    put("registry_auth", "auth-file-2", bytes([3]) + json.dumps(auth).encode())
    put("registry_auth", "bearer", bytes([1]) + b'Bearer realm="https://auth.example.com/token",service="registry",scope="repository:a/b:pull"')
    put("registry_auth", "basic-and-bearer", bytes([1]) + b'Basic realm="x, y", Bearer realm="https://a/t\\"q\\"",error="invalid_token"')
    put("registry_auth", "token", bytes([2]) + b'{"token":"abc","expires_in":300}')
    put("registry_auth", "access-token", bytes([2]) + b'{"access_token":"abc","expires_in":18446744073709551615}')

    start = {"type": "start", "argv": ["/bin/httpd", "-f"], "env": ["USER=qcloud"], "working_dir": "/",
             "user": "1000:1000", "ready_timeout_ms": 30000, "resolv_conf": "nameserver 10.0.2.3\n"}
    host_lines = [{"type": "hello", "version": 3}, start, {"type": "stop", "grace_ms": 2000},
                  {"type": "refresh", "entropy_hex": "00ff", "unix_time_ns": 1700000000000000000},
                  {"type": "ping", "seq": 7}]
    put("agent_protocol", "control", bytes([0]) + b"".join(json.dumps(l).encode() + b"\n" for l in host_lines))
    head = (b"POST /event-invoke HTTP/1.1\r\nhost: 127.0.0.1:9000\r\n"
            b"X-Scf-Request-Id: 1b4e28ba-2fa1-11d2-883f-0016d3cca427\r\ncontent-length: 2\r\n\r\n{}")
    put("agent_protocol", "head", bytes([0xff]) + head)
    put("agent_protocol", "head-cut", bytes([9]) + head + b"GET /x HTTP/1.1\r\nx-scf-request-id: second\r\n\r\n")

    agent_lines = [{"type": "hello", "version": 3, "agent": "fnvm-agent 0.1.0", "uptime_ms": 120},
                   {"type": "log", "stream": "stdout", "unix_time_us": 1700000000000000, "line": "listening"},
                   {"type": "request", "id": "req-1"},
                   {"type": "pong", "seq": 0, "unix_time_us": 1700000000000000},
                   {"type": "pong", "seq": 1, "unix_time_us": 18446744073709551615},
                   {"type": "ready", "after_ms": 12, "after_us": 12345},
                   {"type": "log", "stream": "stderr", "unix_time_us": 18446744073709551615, "line": "late"},
                   {"type": "start_failed", "message": "no", "last_lines": ["a"]},
                   {"type": "exited", "code": None, "signal": 9},
                   {"type": "error", "message": "bad"}, {"type": "refreshed"}]
    put("host_link", "session", bytes([1]) + b"".join(json.dumps(l).encode() + b"\n" for l in agent_lines))
    put("host_link", "old-version", bytes([0]) + b'{"type":"hello","version":2,"agent":"x","uptime_ms":1}\n')

    spec = {"image": "registry.example.com/team/app:1.0", "type": "web", "command": "/bin/app",
            "args": ["--port", "9000"], "env": {"A": "1"}, "memory_mb": 256, "timeout_s": 10,
            "provisioned_concurrency": 1, "concurrency": 4, "max_instances": 3,
            "schedules": ["*/5 * * * *"], "network": "egress", "egress_deny": ["10.0.0.0/8"],
            "egress_allow": ["0.0.0.0/0", "::/0"]}
    put("service_spec", "web", b"default/fn\n" + json.dumps(spec).encode())
    put("service_spec", "event", b"team/ev\n" + json.dumps({"image": "r.example.com/x@" + A_DIGEST, "type": "event",
                                                            "network": "none"}).encode())
    put("service_spec", "bad-number", b"default/fn\n" + b'{"image":"r.example.com/x:1","memory_mb":1e3}')


blk_seeds()
vsock_seeds()
net_seeds()
unpack_seeds()
json_seeds()
