"""A minimal Lambda runtime over the Runtime API (2018-06-01), standard
library only, SnapStart-aware: it initializes (imports, state), runs its
before-snapshot hook, waits in restore/next, runs its after-restore hook,
then serves invocation/next forever with `handler` below.

`kiln fn create echo-rt --image python-echo:1.0.0 --entrypoint
"/usr/bin/python3 /app/runtime.py"`. ECHO_INIT_FAIL=1 in its environment
makes the init fail (init/error), to try that path."""
import json
import os
import socket
import time
import urllib.error
import urllib.request

API = "http://%s/2018-06-01/runtime" % os.environ["AWS_LAMBDA_RUNTIME_API"]
# This environment's state: what its hooks did, what it has served.
STATE = {"before_snapshot": 0, "after_restore": 0, "count": 0, "env": None}


def call(method, path, body=None, headers=None):
    request = urllib.request.Request(
        API + path, data=body, method=method, headers=headers or {}
    )
    with urllib.request.urlopen(request) as answer:
        return answer.headers, answer.read()


def post_json(path, value, headers=None):
    call("POST", path, json.dumps(value).encode(), headers)


def handler(event, request_id):
    """Echoes the event with what must differ between environments."""
    if isinstance(event, dict) and event.get("fail"):
        raise ValueError("asked to fail")
    if isinstance(event, dict) and "sleep" in event:
        time.sleep(float(event["sleep"]))
    STATE["count"] += 1
    with open("/proc/sys/kernel/random/uuid") as uuid:
        kernel_uuid = uuid.read().strip()
    return {
        "echo": event,
        "request_id": request_id,
        "function": os.environ["AWS_LAMBDA_FUNCTION_NAME"],
        "uuid": kernel_uuid,
        "random": os.urandom(16).hex(),
        "hostname": socket.gethostname(),
        "env": STATE["env"],
        "count": STATE["count"],
        "before_snapshot": STATE["before_snapshot"],
        "after_restore": STATE["after_restore"],
    }


def main():
    if os.environ.get("ECHO_INIT_FAIL"):
        post_json("/init/error", {"errorMessage": "init failed on purpose",
                                  "errorType": "EchoInitError"},
                  {"Lambda-Runtime-Function-Error-Type": "EchoInitError"})
        time.sleep(3600)
    STATE["before_snapshot"] += 1
    print("echo runtime: init done, waiting in restore/next", flush=True)
    call("GET", "/restore/next")
    STATE["after_restore"] += 1
    STATE["env"] = os.urandom(8).hex()
    print("echo runtime: restored as %s" % STATE["env"], flush=True)
    while True:
        headers, body = call("GET", "/invocation/next")
        request_id = headers["Lambda-Runtime-Aws-Request-Id"]
        print("echo runtime: event %s" % request_id, flush=True)
        try:
            result = handler(json.loads(body or b"null"), request_id)
        except Exception as err:  # the handler's failure is the event's
            post_json("/invocation/%s/error" % request_id,
                      {"errorMessage": str(err), "errorType": type(err).__name__},
                      {"Lambda-Runtime-Function-Error-Type": "Unhandled"})
            continue
        post_json("/invocation/%s/response" % request_id, result)


main()
