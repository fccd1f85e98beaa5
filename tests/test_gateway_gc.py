"""The gateway's garbage-collector settings (proxy/__main__.py): no pause every few requests.

The startup hook freezes the heap and changes the process's collector for good, so it
runs in a child Python, never in the test process.
"""

from __future__ import annotations

import json
import subprocess
import sys

from runtime.settings import CODE_DIR

# In a fresh interpreter: run the startup hook, then churn as requests do (a dozen
# objects each, held until a batch is written, as the request log holds its rows, then
# let go) and count the young collections that ran meanwhile.
CHURN = """
import asyncio, gc, json
from proxy.__main__ import freeze_startup_heap
asyncio.run(freeze_startup_heap(None))
runs = []
gc.callbacks.append(lambda phase, info: phase == "start" and runs.append(info["generation"]))
held = []
for request in range(2_000):
    held.append([{"request": request, "part": part} for part in range(11)])
    if len(held) == 200:
        held = []  # the batch is written
print(json.dumps({"collections": len(runs), "frozen": gc.get_freeze_count()}))
"""


def test_young_collections_do_not_run_every_few_requests():
    done = subprocess.run(
        [sys.executable, "-c", CHURN],
        cwd=CODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    figures = json.loads(done.stdout)
    assert figures["frozen"] > 0, "the startup heap was not frozen"
    # 2,000 requests of a dozen container objects each, 200 at a time: at CPython's
    # default threshold (700) that is a young collection every ~60 requests.
    assert figures["collections"] == 0
