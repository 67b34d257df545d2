#!/usr/bin/env python3
"""bench/soak.py - drive a running `tandem serve` with a mix of clients for a
given time and print one `bench=soak` line (bench/soak.sh starts the server
and calls this; loopback only, a bounded number of clients).

    bench/soak.py URL SECONDS SERVER_PID [--clients N] [--warmup S]

Clients (each worker picks one kind per round, by weight):
  greedy      non-streaming completion at temperature 0 from a fixed prompt set:
              its text must equal the solo run of that prompt taken at the start
  stream      streaming chat at temperature 0: the concatenated deltas must
              equal the solo run, and the stream end with [DONE]
  sampled     temperature 0.8, top_p 0.9: must answer 200
  drop        a stream abandoned after its first event (the socket closed)
  hostile     one of tests/server/client_test.py's hostile requests: must get a
              4xx in the OpenAI error format; broken HTTP must get a 4xx, 505 or
              a closed connection
  slow        headers trickled a line every 0.5 s: the server must close it
  health      GET /health: 200
Every 5 s the server's RSS is sampled from /proc; the figure after --warmup
seconds is the baseline of rss_growth = (RSS at the end - baseline) / baseline.
The server must still be alive at the end. Exit status 1 when anything was
wrong (a crash, a wrong status, a greedy output that changed).
"""
import json
import os
import random
import select
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "server"))
import client_test as ct  # noqa: E402  (the server tests' client helpers and hostile requests)

PROMPTS = ["Package: vim\n", "Package: git\nVersion:", "Package: libc6\nDescription:", "Source: openssl\n"]
CHATS = ["Package: vim", "Package: curl", "What is bash?"]
KINDS = [("greedy", 30), ("stream", 20), ("sampled", 10), ("drop", 8), ("hostile", 25), ("slow", 2), ("health", 5)]


def rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def completion(base, prompt):
    return base.post("/v1/completions", {"prompt": prompt, "max_tokens": 24, "temperature": 0})


def chat_stream(base, text):
    c = base.conn(120)
    try:
        c.request("POST", "/v1/chat/completions", body=json.dumps(ct.chat_body(text, max_tokens=24, stream=True)),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return r.status, None
        ev = ct.read_sse(r)
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in ev
                       if isinstance(e, dict) and e.get("choices"))
        return 200, text if ev and ev[-1] == "[DONE]" else None
    finally:
        c.close()


class Soak:
    def __init__(self, base, pid, secs, warmup):
        self.base, self.pid, self.secs, self.warmup = base, pid, secs, warmup
        self.lock = threading.Lock()
        self.counts = {k: 0 for k, _ in KINDS}
        self.wrong = {}  # kind -> count of wrong answers
        self.examples = []
        self.greedy_same = self.greedy_total = 0
        self.hostile, self.raws = ct.hostile_requests(base)
        self.solo_text = {p: completion(base, p)[1]["choices"][0]["text"] for p in PROMPTS}
        self.solo_chat = {t: chat_stream(base, t)[1] for t in CHATS}
        self.rss = []  # (seconds since start, MB)
        self.t0 = time.time()

    def bad(self, kind, what):
        with self.lock:
            self.wrong[kind] = self.wrong.get(kind, 0) + 1
            if len(self.examples) < 20:
                self.examples.append("%s: %s" % (kind, what[:200]))

    def one(self, kind, rng):
        b = self.base
        if kind == "greedy":
            p = rng.choice(PROMPTS)
            st, r = completion(b, p)
            same = st == 200 and r["choices"][0]["text"] == self.solo_text[p]
            with self.lock:
                self.greedy_total += 1
                self.greedy_same += same
            if not same:
                self.bad(kind, "%s -> %s %r" % (p.strip(), st, str(r)[:100]))
        elif kind == "stream":
            t = rng.choice(CHATS)
            st, text = chat_stream(b, t)
            same = st == 200 and text == self.solo_chat[t]
            with self.lock:
                self.greedy_total += 1
                self.greedy_same += same
            if not same:
                self.bad(kind, "%s -> %s %r" % (t, st, text))
        elif kind == "sampled":
            st, r = b.post("/v1/completions", {"prompt": rng.choice(PROMPTS), "max_tokens": 24, "temperature": 0.8,
                                               "top_p": 0.9, "seed": rng.randrange(1 << 30)})
            if st != 200:
                self.bad(kind, "%s %r" % (st, str(r)[:100]))
        elif kind == "drop":
            body = json.dumps({"prompt": rng.choice(PROMPTS), "max_tokens": 200, "ignore_eos": True,
                               "stream": True}).encode()
            s = socket.create_connection((b.host, b.port), timeout=60)
            try:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                buf = b""
                while b"data: " not in buf:
                    got = s.recv(4096)
                    if not got:
                        self.bad(kind, "closed before the first event: %r" % buf[:100])
                        break
                    buf += got
            finally:
                s.close()
        elif kind == "hostile":
            if rng.random() < 0.9:
                what, fn = rng.choice(self.hostile)
                try:
                    r = fn()
                    st, body = r if isinstance(r, tuple) else (r, None)
                except Exception as e:
                    st, body = 0, repr(e)
                if not (400 <= st < 500) or (isinstance(body, dict) and not ct.is_openai_error(body)):
                    self.bad(kind, "%s -> %s %s" % (what, st, str(body)[:100]))
            else:
                raw = rng.choice(self.raws)
                try:
                    st = b.raw(raw)
                except OSError:
                    st = 0
                if not (st == 0 or 400 <= st < 500 or st == 505):
                    self.bad(kind, "broken HTTP %r -> %s" % (raw[:40], st))
        elif kind == "slow":
            s = socket.create_connection((b.host, b.port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            t0, closed = time.time(), False
            try:
                while not closed and time.time() - t0 < 30:
                    s.sendall(b"X-Slow: 1\r\n")
                    closed = not s.recv(4096) if select.select([s], [], [], 0.5)[0] else False
            except OSError:
                closed = True
            s.close()
            if not closed:
                self.bad(kind, "a trickling client kept its connection 30 s")
        elif kind == "health":
            st, h = b.request("GET", "/health")
            if st != 200:
                self.bad(kind, "%s %r" % (st, h))
        with self.lock:
            self.counts[kind] += 1

    def worker(self, seed):
        rng = random.Random(seed)
        names = [k for k, _ in KINDS]
        weights = [w for _, w in KINDS]
        while time.time() - self.t0 < self.secs:
            kind = rng.choices(names, weights)[0]
            try:
                self.one(kind, rng)
            except Exception as e:  # a reset or a timeout where an answer was due
                self.bad(kind, "exception %r" % e)

    def sampler(self):
        while time.time() - self.t0 < self.secs:
            try:
                self.rss.append((time.time() - self.t0, rss_mb(self.pid)))
            except OSError:
                return
            time.sleep(5)


def main():
    if len(sys.argv) < 4:
        print(__doc__)
        sys.exit(2)
    url, secs, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    opts = dict(a[2:].split("=", 1) for a in sys.argv[4:] if a.startswith("--") and "=" in a)
    clients, warmup = int(opts.get("clients", 6)), float(opts.get("warmup", min(120.0, secs / 10)))
    base = ct.Base(url)
    rss0 = rss_mb(pid)
    s = Soak(base, pid, secs, warmup)
    threads = [threading.Thread(target=s.worker, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=s.sampler))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alive = os.path.exists("/proc/%d" % pid)
    h = base.health() if alive else {}
    rss_end = rss_mb(pid) if alive else 0.0
    warm = [m for t, m in s.rss if t >= warmup] or [rss_end]
    growth = (rss_end - warm[0]) / warm[0] if warm[0] else 0.0
    served = sum(s.counts.values())
    wrong = sum(s.wrong.values())
    for e in s.examples:
        print("  wrong: " + e)
    # the RSS curve, one sample a minute, to tell a plateau from a steady climb
    print("# rss_MB_by_minute: " + " ".join("%d:%.1f" % (t // 60, m) for t, m in s.rss if int(t) % 60 < 5))
    print("bench=soak model=demo seconds=%d clients=%d requests=%d %s wrong=%d wrong_by_kind=%s "
          "rss_start_MB=%.1f rss_warm_MB=%.1f rss_max_MB=%.1f rss_end_MB=%.1f rss_growth=%.3f "
          "greedy_identical=%d/%d closed_slow_headers=%s server_alive=%s" %
          (secs, clients, served, " ".join("%s=%d" % kv for kv in s.counts.items()), wrong,
           ",".join("%s:%d" % kv for kv in s.wrong.items()) or "none", rss0, warm[0],
           max([m for _, m in s.rss] + [rss_end]), rss_end, growth, s.greedy_same, s.greedy_total,
           h.get("closed_slow_headers", "?"), "yes" if alive else "no"), flush=True)
    sys.exit(0 if alive and wrong == 0 and s.greedy_same == s.greedy_total and growth < 0.10 else 1)


if __name__ == "__main__":
    main()
