"""The python image's entrypoint: proves the interpreter, the stdlib and an
extension module (_json) work, and says where it runs."""
import json
import os
import platform
import sys

print(json.dumps({
    "greeting": "Hello from Python in a Kiln microVM!",
    "python": platform.python_version(),
    "kernel": platform.release(),
    "hostname": platform.node(),
    "argv": sys.argv[1:],
    "pid": os.getpid(),
}, sort_keys=True))
