"""A Lambda function written exactly as for AWS Lambda (Python 3.11), run
by awslambdaric under Kiln's Runtime API with SnapStart-style hooks.

Its init does real work, once, in the template: it imports a realistic set
of modules, builds a lookup table, and registers a before-snapshot and an
after-restore hook (snapshot-restore-py). The after-restore hook refreshes
what must differ between clones (AWS's SnapStart uniqueness advice): the
environment's id and its random generator."""
import base64
import collections
import datetime
import decimal
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import socket
import time
import urllib.parse
import uuid

from snapshot_restore_py import register_after_restore, register_before_snapshot

logger = logging.getLogger()
logger.setLevel(logging.INFO)

# State built at init: a table the handler uses, and what the hooks did.
WORDS = {word: hashlib.sha256(word.encode()).hexdigest()[:8]
         for word in re.findall(r"[a-z]+", json.__doc__.lower())}
STATE = collections.Counter()
ENV = {"id": None, "rng": random.Random(0)}


@register_before_snapshot
def before_snapshot():
    STATE["before_snapshot"] += 1
    logger.info("before-snapshot hook: %d words indexed", len(WORDS))


@register_after_restore
def after_restore():
    STATE["after_restore"] += 1
    # Unique per clone: the kernel's pool was reseeded before this ran.
    ENV["id"] = uuid.uuid4().hex
    ENV["rng"] = random.Random(os.urandom(16))
    logger.info("after-restore hook: environment %s", ENV["id"])


def handler(event, context):
    if isinstance(event, dict) and event.get("fail"):
        raise ValueError("asked to fail")
    if isinstance(event, dict) and "sleep" in event:
        time.sleep(float(event["sleep"]))
    STATE["count"] += 1
    logger.info("event %s", context.aws_request_id)
    return {
        "echo": event,
        "request_id": context.aws_request_id,
        "function": context.function_name,
        "env": ENV["id"],
        "count": STATE["count"],
        "before_snapshot": STATE["before_snapshot"],
        "after_restore": STATE["after_restore"],
        "random": ENV["rng"].getrandbits(64),
        "hostname": socket.gethostname(),
        "words": len(WORDS),
        "at": email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc)),
        "quoted": urllib.parse.quote(str(decimal.Decimal("1.10"))),
        "b64": base64.b64encode(b"kiln").decode(),
    }
