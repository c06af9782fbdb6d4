"""The image's build test: the runtime, its native client (and the C++
libraries it needs) and the function's module import; the hooks register."""
import runtime_client  # awslambdaric's native Runtime API client
import awslambdaric.bootstrap
import snapshot_restore_py
import app

print("python-lambda ok: awslambdaric", awslambdaric.__version__,
      "with", len(snapshot_restore_py.get_before_snapshot()), "before-snapshot and",
      len(snapshot_restore_py.get_after_restore()), "after-restore hook(s)")
