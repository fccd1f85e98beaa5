"""`./console.sh bench`: llamagate measured side by side with the direct path, in one run.

- stack.py     a private stack in a temp LLAMAGATE_ROOT on free ports, always cleaned up
- upstream.py  the canned upstream of scenario 1 (its own process), and scenario 8's
               one-at-a-time backends (--count, --service-seconds), which count overlaps
- loadgen.py   wrk, the load generator of scenario 1
- client.py    the aiohttp client of the model scenarios
- overhead.py  scenario 1 (added latency, throughput) and 5 (the gateway's memory)
- model.py     scenarios 2 (streaming), 3 (fairness) and 4 (restart under load)
- capacity.py  scenario 7 (tokens/s and queue wait of 1 and 2 replicas)
- scaleout.py  scenario 8 (throughput over 1 to 8 canned backends against linear)
- twogateways.py scenario 9 from start to end (two gateways sharing two members)
- sharedfigures.py its clients and rows; sharedstack.py its members and gateways
- scenarios.py the run from start to end
- report.py    the table and its JSON, with each target met or missed
"""
