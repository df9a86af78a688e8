#!/usr/bin/env python3
"""Measures how long a 4202-token prompt stalls a concurrent stream in `s2lc serve`.

Usage: prefill_stall.py S2LC_BINARY PREFILL_CHUNK [KV_SPEC]; prints one JSON line: the longest and
median gap between the stream's events, and the long request's time. Needs the assets of
scripts/fetch-assets (alice29.txt, the SmolLM2 GGUF); starts its own server on a free port.
"""
import http.client, json, os, sys, tempfile, threading, time, subprocess, re
binary, chunk = sys.argv[1], sys.argv[2]
kv = sys.argv[3] if len(sys.argv) > 3 else 'q8'
text = open(os.path.join(os.environ.get('S2LC_HOME', os.path.expanduser('~/.cache/s2lc')), 'text/canterbury/alice29.txt')).read()
p = subprocess.Popen([binary, 'serve', '--port', '0', '--model-id', 'm', '--prefill-chunk', chunk,
                      '--store', tempfile.mkdtemp(), '--max-tokens', '4096', '--kv', kv], stderr=subprocess.PIPE, text=True)
addr = None
for line in p.stderr:
    m = re.search(r'listening on http://(\S+)', line)
    if m: addr = m.group(1); break
threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
host, port = addr.split(':')
def post(body, stream=False):
    c = http.client.HTTPConnection(host, int(port), timeout=600)
    c.request('POST', '/v1/completions', json.dumps(body), {'Content-Type': 'application/json'})
    return c.getresponse()
# warm up
post({'prompt': 'Hello', 'max_tokens': 2}).read()
gaps = []
def streamer():
    r = post({'prompt': 'Alice was beginning', 'max_tokens': 400, 'stream': True})
    last = None
    for line in r:
        if line.startswith(b'data:'):
            t = time.time()
            if last is not None: gaps.append(t - last)
            last = t
th = threading.Thread(target=streamer); th.start()
time.sleep(1.5)
t0 = time.time()
long_prompt = text[:16000]
r = post({'prompt': long_prompt, 'max_tokens': 1})
body = json.loads(r.read())
long_s = time.time() - t0
th.join()
p.kill()
gaps.sort()
print(json.dumps({'kv': kv, 'prefill_chunk': int(chunk), 'long_prompt_tokens': body['usage']['prompt_tokens'],
                  'long_request_s': round(long_s, 2), 'stream_max_gap_s': round(gaps[-1], 3),
                  'stream_p50_gap_s': round(gaps[len(gaps)//2], 4)}))
