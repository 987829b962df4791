"""Reference 1 of the benchmark: the straightforward alternative to the exporter's web layer.

Serves the same wolkvox_* series as a saved exporter page, each family as a plain
``prometheus_client.Gauge`` (with the same label names, label values and sample values) in the default
registry, so the process_* / python_* collectors are there too, exactly as on the exporter's page.
``prometheus_client.start_http_server`` renders the registry on every scrape and gzips it when the
client sends ``Accept-Encoding: gzip``.

    python benchmarks/reference_server.py --page saved-metrics.txt --port 0

Prints ``reference listening on http://127.0.0.1:PORT`` on stderr once bound, then serves until
SIGTERM/SIGINT (or until ``--max-seconds`` have passed, so it can never outlive a crashed benchmark).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from prometheus_client import Gauge, start_http_server
from prometheus_client.parser import text_string_to_metric_families


def load_gauges(text: str) -> int:
    """Registers one Gauge per wolkvox_* sample name of ``text``; returns the number of samples set."""
    count = 0
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("wolkvox_"):
            continue  # process_* and python_* come from prometheus_client's own default collectors
        gauges: dict[str, Gauge] = {}
        for sample in family.samples:
            gauge = gauges.get(sample.name)
            if gauge is None:
                gauge = gauges[sample.name] = Gauge(sample.name, family.documentation, list(sample.labels))
            if sample.labels:
                gauge.labels(**sample.labels).set(sample.value)
            else:
                gauge.set(sample.value)
            count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page", required=True, help="a saved /metrics page of the exporter")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="exit after this long regardless")
    args = parser.parse_args()
    samples = load_gauges(Path(args.page).read_text(encoding="utf-8"))
    server, _thread = start_http_server(args.port, addr="127.0.0.1")
    port = server.server_address[1]
    print(f"reference: {samples} wolkvox samples", file=sys.stderr)
    print(f"reference listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait(args.max_seconds)
    server.server_close()  # handler threads are daemons: they end with the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
