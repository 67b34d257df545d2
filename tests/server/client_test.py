#!/usr/bin/env python3
"""client_test.py - drives a running `tandem serve` over HTTP; run by tests/server/run.sh.

    client_test.py BASE_URL SECTION [options]

Sections (each prints "ok ..." / "FAIL ..." lines and exits 1 on any failure):
  openai       the official openai client: chat and completions, streaming and
               not, usage in the last chunk, logprobs, stop strings, errors
               (exits 77 when the openai package is not importable)
  determinism  greedy outputs of 16 prompts run one at a time equal the same
               16 run concurrently (--report-only: print the count, never fail)
  hostile      200 malformed or hostile requests all get a 4xx; still healthy
  drop         clients that hang up mid-stream or while waiting leave no
               sequence behind (/health running and queued return to 0)
  queue        a full queue answers 503 with Retry-After in the OpenAI error format,
               before the body is parsed (malformed JSON gets 503 too while full)
  limits       a 200 MB chunked body gets 413; 600 idle connections do not keep
               /health from answering for long
  auth         (server started with an API key KEY) 401 without it or with a
               wrong one, /health open, 200 with it
  reasoning    a template that opens <think> puts the reply in reasoning_content
Only the standard library is needed, except for the openai section.
"""
import http.client
import json
import select
import socket
import sys
import threading
import time
import urllib.parse

FAILS = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILS.append(what)
    return cond


class Base:
    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port

    def conn(self, timeout=120):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout=120, want_headers=False):
        """-> (status, parsed JSON or raw bytes[, response headers])"""
        c = self.conn(timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            elif isinstance(body, str):
                body = body.encode()
            h = {"Content-Type": "application/json"}
            h.update(headers or {})
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            try:
                data = json.loads(data)
            except ValueError:
                pass
            return (r.status, data, dict(r.getheaders())) if want_headers else (r.status, data)
        finally:
            c.close()

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def health(self):
        return self.request("GET", "/health")[1]

    def raw(self, data, read=True, timeout=30):
        """Send raw bytes on a fresh socket; return the status code (or 0)."""
        s = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            s.sendall(data)
            if not read:
                return 0
            buf = b""
            while b"\r\n" not in buf:
                got = s.recv(4096)
                if not got:
                    break
                buf += got
            parts = buf.split(b" ", 2)
            return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        finally:
            s.close()


def is_openai_error(body):
    e = body.get("error") if isinstance(body, dict) else None
    return isinstance(e, dict) and isinstance(e.get("message"), str) and isinstance(e.get("type"), str) \
        and "param" in e and "code" in e


def chat_body(text, max_tokens=48, **kw):
    b = {"model": "demo", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
         "temperature": 0}
    b.update(kw)
    return b


def read_sse(resp):
    """Events of an SSE response: parsed JSON objects, then the string '[DONE]'."""
    events, buf = [], b""
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.rstrip(b"\r\n")
        if line.startswith(b"data: "):
            d = line[6:].decode()
            events.append(d if d == "[DONE]" else json.loads(d))
    return events


def wait_idle(base, secs):
    t0 = time.time()
    h = base.health()
    while time.time() - t0 < secs:
        h = base.health()
        if h["running"] == 0 and h["queued"] == 0:
            return h, time.time() - t0
        time.sleep(0.05)
    return h, time.time() - t0


# ---- sections -----------------------------------------------------------------

def sec_openai(base, args):
    try:
        import openai
    except ImportError:
        print("SKIP openai client tests: the openai package is not installed")
        sys.exit(77)
    client = openai.OpenAI(base_url="http://%s:%d/v1" % (base.host, base.port), api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "Package: vim"}]
    models = client.models.list()
    check([m.id for m in models.data] == ["demo"], "openai: models.list() names the served model")

    r = client.chat.completions.create(model="demo", messages=msgs, max_tokens=32, temperature=0)
    text = r.choices[0].message.content
    check(isinstance(text, str) and len(text) > 0, "openai: chat completion has content (%r...)" % text[:40])
    check(r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens +
          r.usage.completion_tokens, "openai: chat usage adds up")
    check(r.choices[0].finish_reason in ("stop", "length"), "openai: finish_reason %s" % r.choices[0].finish_reason)

    chunks = list(client.chat.completions.create(model="demo", messages=msgs, max_tokens=32, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(streamed == text, "openai: streamed chat text equals the non-streamed text")
    check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
          and not chunks[-1].choices, "openai: the last stream chunk carries usage")
    fins = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(fins == [r.choices[0].finish_reason], "openai: one finish_reason in the stream")

    c = client.completions.create(model="demo", prompt="Package: curl\n", max_tokens=24, temperature=0)
    check(len(c.choices[0].text) > 0 and c.usage.completion_tokens > 0, "openai: text completion")
    cs = list(client.completions.create(model="demo", prompt="Package: curl\n", max_tokens=24, temperature=0,
                                        stream=True))
    check("".join(x.choices[0].text for x in cs if x.choices) == c.choices[0].text,
          "openai: streamed text completion equals the non-streamed one")

    lp = client.chat.completions.create(model="demo", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                        top_logprobs=3)
    content = lp.choices[0].logprobs.content
    ok = len(content) == lp.usage.completion_tokens or (lp.choices[0].finish_reason == "stop"
                                                        and len(content) == lp.usage.completion_tokens - 1)
    ok = ok and all(len(t.top_logprobs) == 3 and t.logprob <= 0 and
                    abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4 for t in content)
    check(ok, "openai: logprobs with top_logprobs=3 (greedy: the chosen token is the top one)")
    check("".join(t.token for t in content) == lp.choices[0].message.content,
          "openai: the logprob tokens spell the content")

    stop_at = text.split()[1] if len(text.split()) > 1 else text[:3]
    rs = client.chat.completions.create(model="demo", messages=msgs, max_tokens=32, temperature=0, stop=[stop_at])
    check(rs.choices[0].finish_reason == "stop" and stop_at not in rs.choices[0].message.content and
          text.startswith(rs.choices[0].message.content), "openai: stop string %r cuts the text" % stop_at)
    ss = list(client.chat.completions.create(model="demo", messages=msgs, max_tokens=32, temperature=0,
                                             stop=stop_at, stream=True))
    check("".join(c.choices[0].delta.content or "" for c in ss if c.choices) == rs.choices[0].message.content,
          "openai: a streamed stop string is never sent")

    s1 = client.chat.completions.create(model="demo", messages=msgs, max_tokens=24, temperature=1.0, seed=7)
    s2 = client.chat.completions.create(model="demo", messages=msgs, max_tokens=24, temperature=1.0, seed=7)
    check(s1.choices[0].message.content == s2.choices[0].message.content, "openai: a seed repeats a sampled reply")

    for kw, what in (({"model": "nope"}, "unknown model"), ({"n": 2}, "n=2"),
                     ({"temperature": 5}, "temperature out of range")):
        args2 = dict(model="demo", messages=msgs, max_tokens=4)
        args2.update(kw)
        try:
            client.chat.completions.create(**args2)
            check(False, "openai: %s is refused" % what)
        except openai.BadRequestError as e:
            check(e.status_code == 400 and isinstance(e.body, dict) and "message" in e.body,
                  "openai: %s -> BadRequestError 400" % what)
    try:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x " * 2000}],
                                       max_tokens=4)
        check(False, "openai: a prompt longer than the context is refused")
    except openai.BadRequestError as e:
        check(e.code == "context_length_exceeded", "openai: prompt longer than the context -> 400 "
              "context_length_exceeded")


PROMPTS = ["Package: %s" % p for p in ("vim", "curl", "python3-numpy", "libssl-dev", "nginx", "git", "emacs",
                                       "gcc", "tmux", "htop", "rsync", "zsh", "sqlite3", "openssh-server",
                                       "ffmpeg", "postgresql")]


def sec_determinism(base, args):
    def one(i, out):
        body = chat_body(PROMPTS[i], max_tokens=48)
        if i % 2:  # half of them through the completions endpoint, streaming
            body = {"prompt": PROMPTS[i] + "\n", "max_tokens": 48, "temperature": 0, "stream": i % 4 == 1}
            c = base.conn()
            c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = c.getresponse()
            if body["stream"]:
                ev = read_sse(resp)
                out[i] = "".join(e["choices"][0]["text"] for e in ev if isinstance(e, dict) and e["choices"])
            else:
                out[i] = json.loads(resp.read())["choices"][0]["text"]
            c.close()
        else:
            st, r = base.post("/v1/chat/completions", body)
            out[i] = r["choices"][0]["message"]["content"] if st == 200 else "HTTP %d" % st

    alone = [None] * 16
    for i in range(16):
        one(i, alone)
    together = [None] * 16
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], base.health()["running"])
            time.sleep(0.01)

    h0 = base.health()
    w = threading.Thread(target=watch)
    w.start()
    ts = [threading.Thread(target=one, args=(i, together)) for i in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    w.join()
    h1 = base.health()
    differ = [i for i in range(16) if alone[i] != together[i]]
    steps, toks = h1["steps"] - h0["steps"], h1["tokens_generated"] - h0["tokens_generated"]
    tag = args.get("tag", "")
    if args.get("report_only"):
        print("info %sgreedy outputs alone vs 16 concurrent: %d of 16 differ %s" % (tag, len(differ), differ))
        return
    check(all(isinstance(x, str) and x and not x.startswith("HTTP") for x in alone), "determinism: 16 replies")
    check(not differ, "determinism: greedy outputs alone == among 16 concurrent (%d differ: %s)" %
          (len(differ), differ))
    check(peak[0] >= 8 and toks > steps, "determinism: requests were batched (peak running %d, %d tokens in %d "
          "steps)" % (peak[0], toks, steps))


def hostile_requests(base):
    """(description, callable returning a status) for 200 requests that must each get a 4xx."""
    good = json.dumps(chat_body("Package: vim", max_tokens=4))
    reqs = []

    def post(path, body, what):
        reqs.append((what, lambda: base.post(path, body)))

    C, T = "/v1/chat/completions", "/v1/completions"
    # truncated JSON: every proper prefix of an object is invalid
    for k in range(1, len(good), max(1, len(good) // 60)):
        post(C, good[:k], "truncated body at %d" % k)
    for body in ["", "{", "[", "nul", "{}x", "{\"messages\": [}", "{'messages': []}", "{\"a\":1,}", "\x00",
                 "{\"messages\": [{\"role\": \"user\", \"content\": \"\\ud800\"}]}",
                 "{\"messages\": [{\"role\": \"user\", \"content\": \"a\\u0000b\"}]}", "[" * 100000 + "]" * 100000,
                 "{\"a\":" * 50000 + "1" + "}" * 50000, "1e99999", "{\"max_tokens\": 1e99999}",
                 "{\"max_tokens\": 99999999999999999999999}"]:
        post(C, body, "malformed JSON %r" % body[:30])
    for raw in [b'{"messages":[{"role":"user","content":"\xff\xfe"}]}', b'{"messages":[{"role":"user","content":"\xc0\xaf"}]}',
                b'{"messages":[{"role":"user","content":"\xed\xa0\x80"}]}', b'{"prompt":"\xe2\x82"}',
                b'\xef\xbb\xbf{"prompt":"x"}' + b"\xff"]:
        post(C if b"messages" in raw else T, raw, "invalid UTF-8 %r" % raw[:20])
    for body in [[], "str", 123, None, True, [1, 2]]:
        post(C, json.dumps(body), "body is not an object: %r" % (body,))
    bad_fields = [
        ("messages", "x"), ("messages", 1), ("messages", {}), ("messages", []), ("messages", [1]),
        ("messages", [{"role": 1, "content": "x"}]), ("messages", [{"role": "user", "content": 1}]),
        ("messages", [{"role": "wizard", "content": "x"}]), ("messages", [{"content": "x"}]),
        ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        ("messages", [{"role": "user", "content": [{"type": "text"}]}]),
        ("max_tokens", "10"), ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 1e30), ("max_tokens", 1.5),
        ("max_tokens", 2 ** 62), ("max_tokens", -2 ** 63), ("max_completion_tokens", "many"),
        ("temperature", "hot"), ("temperature", -1), ("temperature", 1e308), ("temperature", 3), ("temperature", []),
        ("top_p", 0), ("top_p", 2), ("top_p", "x"), ("top_k", 1.5), ("min_p", 7), ("presence_penalty", 9),
        ("frequency_penalty", -9), ("repetition_penalty", 0), ("n", 2), ("n", 0), ("n", "1"), ("n", 2 ** 40),
        ("best_of", 3), ("stop", 5), ("stop", [1]), ("stop", [""]), ("stop", ["x"] * 40), ("stop", "x" * 1000),
        ("stop", {"a": 1}), ("logprobs", "yes"), ("top_logprobs", 21), ("top_logprobs", -1), ("top_logprobs", 5),
        ("seed", "x"), ("seed", 1.5), ("seed", 1e300), ("stream", "yes"), ("stream", 1), ("stream_options", 1),
        ("stream_options", {"include_usage": "y"}), ("model", 5), ("model", "gpt-4"), ("model", ""),
        ("model", "x" * 10000), ("logit_bias", {"1": 5}), ("logit_bias", 3), ("echo", True), ("suffix", "x"),
        ("response_format", {"type": "json_object"}), ("response_format", "text"), ("tools", "x"),
        ("chat_template_kwargs", 3), ("ignore_eos", "no"),
    ]
    for k, v in bad_fields:
        b = json.loads(good)
        b[k] = v
        post(C, json.dumps(b), "chat %s=%r" % (k, str(v)[:30]))
    b = json.loads(good)
    del b["messages"]
    post(C, json.dumps(b), "chat without messages")
    for p in [None, 5, [], [-1], [99999999], [1.5], ["a", "b"], [[1, 2], [3]], [["a"]], "", [{"x": 1}],
              True, "word " * 2000]:
        body = {"max_tokens": 4}
        if p is not None:
            body["prompt"] = p
        post(T, json.dumps(body), "completion prompt=%r" % str(p)[:30])
    for k, v in [("logprobs", 6), ("logprobs", True), ("logprobs", -1), ("echo", True), ("best_of", 2)]:
        post(T, json.dumps({"prompt": "x", k: v}), "completion %s=%r" % (k, v))
    big = b'{"prompt": "' + b"a" * (9 << 20) + b'"}'
    reqs.append(("oversized body 9 MiB", lambda: base.post(T, big)))
    reqs.append(("oversized body 9 MiB, chunked", lambda: base.post(
        T, iter([big[i:i + 65536] for i in range(0, len(big), 65536)]))))
    for m, p in [("GET", C), ("PUT", C), ("DELETE", T), ("PATCH", T), ("POST", "/health"), ("POST", "/v1/models"),
                 ("DELETE", "/v1/models")]:
        reqs.append(("%s %s" % (m, p), lambda m=m, p=p: base.request(m, p, b"{}")))
    for p in ["/", "/v1", "/v1/chat", "/v1/chat/completion", "/v2/completions", "/v1/models/nope", "/%ff%fe",
              "/v1/completions/../../etc/passwd", "/" + "a" * 3000]:
        reqs.append(("GET %s" % p[:40], lambda p=p: base.request("GET", p)))
    raws = [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + b"X-A: " + b"b" * 100000 + b"\r\n\r\n",
            b"GARBAGE\r\n\r\n", b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]
    return reqs, raws


def sec_hostile(base, args):
    reqs, raws = hostile_requests(base)
    bad = []
    for what, fn in reqs:
        try:
            r = fn()
            st, body = r if isinstance(r, tuple) else (r, None)
        except Exception as e:  # a reset before the status line is a failure too
            st, body = 0, repr(e)
        ok = 400 <= st < 500
        if ok and isinstance(body, dict) and not is_openai_error(body):
            ok = False
        if not ok:
            bad.append((what, st, str(body)[:120]))
    for b in bad[:20]:
        print("     %s -> %s %s" % b)
    check(len(reqs) >= 200, "hostile: %d requests" % len(reqs))
    check(not bad, "hostile: every one answered with a 4xx in the OpenAI error format (%d not)" % len(bad))
    # broken HTTP is answered by libmicrohttpd itself: a 4xx, 505, or a closed connection
    codes = []
    for raw in raws:
        try:
            codes.append(base.raw(raw))
        except OSError:
            codes.append(0)
    check(all(c == 0 or 400 <= c < 500 or c == 505 for c in codes),
          "hostile: %d requests of broken HTTP refused (%s)" % (len(raws), codes))
    h = base.health()
    check(h["status"] == "ok" and h["running"] == 0 and h["queued"] == 0, "hostile: still healthy, nothing running")
    st, r = base.post("/v1/chat/completions", chat_body("Package: vim", max_tokens=8))
    check(st == 200 and r["choices"][0]["message"]["content"], "hostile: a good request still works")


def sec_drop(base, args):
    body = json.dumps({"prompt": "Package: vim\n", "max_tokens": 400, "ignore_eos": True, "temperature": 0.8,
                       "stream": True}).encode()
    req = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
           % len(body)) + body
    socks = []
    for _ in range(12):  # streams dropped after their first event
        s = socket.create_connection((base.host, base.port), timeout=60)
        s.sendall(req)
        socks.append(s)
    for s in socks:
        buf = b""
        while b"data: " not in buf:
            got = s.recv(4096)
            if not got:
                break
            buf += got
    mid = base.health()
    for s in socks:
        s.close()
    nb = json.dumps({"prompt": "Package: git\n", "max_tokens": 400, "ignore_eos": True}).encode()
    nreq = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(nb)) + nb
    for _ in range(6):  # non-streaming clients that give up while waiting
        base.raw(nreq, read=False)
    h, secs = wait_idle(base, 10)
    check(mid["running"] >= 1, "drop: streams were running when dropped (%d)" % mid["running"])
    check(h["running"] == 0 and h["queued"] == 0, "drop: no sequence left behind %.2f s after 18 clients hung up "
          "(running %d, queued %d)" % (secs, h["running"], h["queued"]))
    st, r = base.post("/v1/completions", {"prompt": "Package: vim\n", "max_tokens": 8, "temperature": 0})
    check(st == 200, "drop: the server still answers")


def sec_queue(base, args):
    """Server started with --max-seqs 1 --queue 1: of 6 concurrent long requests some get 503."""
    res = []
    long_req = {"prompt": "Package: vim\n", "max_tokens": 400, "ignore_eos": True}

    def one():
        res.append(base.post("/v1/completions", long_req, want_headers=True))

    ts = [threading.Thread(target=one) for _ in range(6)]
    for t in ts:
        t.start()
    # while one runs and one waits, admission refuses before parsing: even a
    # malformed body gets 503, not the 400 its parse would give
    t0, h = time.time(), base.health()
    while not (h["running"] == 1 and h["queued"] == 1) and time.time() - t0 < 30:
        time.sleep(0.02)
        h = base.health()
    st, body = base.post("/v1/completions", "{not json")
    check(st == 503 and is_openai_error(body) and body["error"]["code"] == "queue_full",
          "queue: full -> 503 before the body is parsed (malformed JSON got %d %s)" % (st, str(body)[:100]))
    for t in ts:
        t.join()
    codes = sorted(st for st, _, _ in res)
    full = [(b, hd) for st, b, hd in res if st == 503]
    check(codes.count(200) >= 2 and len(full) >= 1 and codes.count(200) + len(full) == 6,
          "queue: 1 slot + 1 queued: %s" % codes)
    check(all(is_openai_error(b) and b["error"]["type"] == "server_error" and b["error"]["code"] == "queue_full"
              for b, _ in full), "queue: 503 bodies are OpenAI errors (server_error, queue_full)")
    check(all(hd.get("Retry-After", "").isdigit() for _, hd in full), "queue: 503 carries Retry-After")


def sec_limits(base, args):
    # 200 MB chunked: read and discarded, then 413 (not a closed connection)
    chunk = b"a" * (1 << 20)

    def body():
        yield b'{"prompt": "'
        for _ in range(200):
            yield chunk
        yield b'"}'

    try:
        st, r = base.post("/v1/completions", body(), timeout=60)
    except Exception as e:  # a reset or a closed connection is the failure tested here
        st, r = 0, repr(e)
    check(st == 413 and is_openai_error(r) and r["error"]["code"] == "request_too_large",
          "limits: a 200 MB chunked body -> 413 (%s %s)" % (st, str(r)[:100]))

    # headers trickled a line every half second: closed at the header deadline
    # (the idle timeout, 10 s, in all), not kept alive by the trickle
    s = socket.create_connection((base.host, base.port), timeout=5)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    t0, closed = time.time(), False
    try:
        while not closed and time.time() - t0 < 20:
            s.sendall(b"X-Slow: 1\r\n")
            r, _, _ = select.select([s], [], [], 0.5)
            closed = bool(r) and s.recv(4096) == b""
    except OSError:
        closed = True
    secs = time.time() - t0
    s.close()
    check(closed and 8 < secs < 15, "limits: trickled headers closed after %.1f s (deadline 10 s)" % secs)

    # 600 idle connections (more than --max-conns): past 3/4 of the limit a
    # waiting connection gets about a second, so /health answers within seconds
    idle = []
    try:
        for _ in range(600):
            try:
                idle.append(socket.create_connection((base.host, base.port), timeout=5))
            except OSError:
                break
        t0, ok = time.time(), False
        while not ok and time.time() - t0 < 30:
            try:
                ok = base.request("GET", "/health", timeout=30)[0] == 200
            except OSError:
                time.sleep(0.2)
        secs = time.time() - t0
    finally:
        for s in idle:
            s.close()
    check(ok and secs < 5, "limits: /health answers %.1f s after %d idle connections were opened" %
          (secs, len(idle)))
    st, _ = base.post("/v1/completions", {"prompt": "Package: vim\n", "max_tokens": 4, "temperature": 0})
    check(st == 200, "limits: the server still answers")


def sec_auth(base, args):
    key = args.get("key", "")
    auth = {"Authorization": "Bearer " + key}
    ok_body = {"prompt": "Package: vim\n", "max_tokens": 4, "temperature": 0}
    st, b, hd = base.post("/v1/completions", ok_body, want_headers=True)
    check(st == 401 and is_openai_error(b) and b["error"]["code"] == "invalid_api_key" and
          hd.get("WWW-Authenticate") == "Bearer", "auth: no key -> 401 with WWW-Authenticate (%d)" % st)
    for bad in ["Bearer " + key[:-1], "Bearer " + key + "x", "Bearer", "Basic " + key, key, "Bearer x" + key[1:]]:
        st, b = base.post("/v1/completions", ok_body, headers={"Authorization": bad})
        check(st == 401 and is_openai_error(b), "auth: %r -> 401 (%d)" % (bad[:12] + "...", st))
    st, b = base.post("/v1/completions", "{bad json", headers={"Authorization": "Bearer nope"})
    check(st == 401, "auth: refused before the body is parsed (%d)" % st)
    st, _ = base.request("GET", "/v1/models")
    check(st == 401, "auth: GET /v1/models without the key -> 401 (%d)" % st)
    st, h = base.request("GET", "/health")
    check(st == 200 and h["status"] == "ok", "auth: /health is open (%d)" % st)
    st, _ = base.request("GET", "/v1/models", headers=auth)
    check(st == 200, "auth: GET /v1/models with the key (%d)" % st)
    st, b = base.post("/v1/completions", ok_body, headers=auth)
    check(st == 200 and b["choices"][0]["text"] is not None, "auth: a completion with the key -> 200 (%d)" % st)
    st, b = base.post("/v1/completions", ok_body, headers={"Authorization": "bearer  " + key})
    check(st == 200, "auth: the scheme is case-insensitive (%d)" % st)


def sec_reasoning(base, args):
    st, r = base.post("/v1/chat/completions", chat_body("Package: vim", max_tokens=24))
    m = r["choices"][0]["message"] if st == 200 else {}
    check(st == 200 and m.get("reasoning_content") and m.get("content") == "",
          "reasoning: the reply after <think> is reasoning_content (%r)" % str(m.get("reasoning_content"))[:40])
    c = base.conn()
    c.request("POST", "/v1/chat/completions", body=json.dumps(chat_body("Package: vim", max_tokens=24, stream=True)),
              headers={"Content-Type": "application/json"})
    ev = read_sse(c.getresponse())
    c.close()
    rs = "".join(e["choices"][0]["delta"].get("reasoning_content", "") for e in ev if isinstance(e, dict)
                 and e["choices"])
    check(rs == m.get("reasoning_content") and ev[-1] == "[DONE]", "reasoning: streamed as reasoning_content deltas")


def main():
    base = Base(sys.argv[1])
    section = sys.argv[2]
    args = {"report_only": "--report-only" in sys.argv}
    for a in sys.argv[3:]:
        if a.startswith("--tag="):
            args["tag"] = a[6:] + ": "
        if a.startswith("--key="):
            args["key"] = a[6:]
    globals()["sec_" + section](base, args)
    sys.exit(1 if FAILS else 0)


if __name__ == "__main__":
    main()
