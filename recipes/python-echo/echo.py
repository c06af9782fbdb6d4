"""Echoes the JSON payload on stdin, with per-clone random values."""
import json
import os
import socket
import sys
import time

text = sys.stdin.read()
request = json.loads(text) if text.strip() else {}
if isinstance(request, dict) and "sleep" in request:
    time.sleep(float(request["sleep"]))
with open("/proc/sys/kernel/random/uuid") as uuid:
    kernel_uuid = uuid.read().strip()
print(json.dumps({
    "echo": request,
    "uuid": kernel_uuid,
    "random": os.urandom(16).hex(),
    "hostname": socket.gethostname(),
}))
