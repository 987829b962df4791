"""``python -m exporter.demo``: the exporter against the bundled simulator, no wolkvox token needed.

Starts the simulator on 127.0.0.1:19727 as a child process, writes a small config with three demo
operations (refreshed every 15 s instead of 5 m, so the numbers move), and runs the exporter on
127.0.0.1:19726 in the foreground. Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from exporter import cli

DEMO_OPERATIONS: list[dict[str, str | int | dict[str, str]]] = [
    {"name": "bogota", "server": "wv9901", "budget_minutes": 40000, "labels": {"client": "acme"}},
    {"name": "lima", "server": "wv0042", "budget_minutes": 25000, "labels": {"client": "acme"}},
    {"name": "medellin", "server": "wv0107", "labels": {"client": "globex"}},
]
DEMO_INTERVAL = "15s"
# The simulator runs with no daily limit (--daily-limit 0), and a 15 s pace makes 5,760 requests per
# token a day: the config's own limit is raised above that so the budget check has nothing to say.
DEMO_DAILY_REQUEST_LIMIT = 100_000


def demo_config(simulator_url: str) -> dict[str, object]:
    return {
        "refresh_interval": DEMO_INTERVAL,
        "daily_request_limit": DEMO_DAILY_REQUEST_LIMIT,
        "operations": [
            {**op, "token": f"demo-token-{op['name']}", "base_url": simulator_url} for op in DEMO_OPERATIONS
        ],
    }


def banner(listen: str, simulator: str) -> str:
    names = ", ".join(str(op["name"]) for op in DEMO_OPERATIONS)
    return "\n".join(
        [
            f"wolkvox-exporter demo: {len(DEMO_OPERATIONS)} operations ({names}) on the bundled simulator,"
            " no token needed.",
            f"  metrics:      http://{listen}/metrics",
            f"  landing page: http://{listen}/",
            f"  simulator:    http://{simulator}/-/stats (requests it answered; faults: POST /-/faults,"
            " see exporter/simulator/faults.py)",
            f"  statement:    http://{listen}/statement?group=client (this month's usage per client)",
            f"Refreshing every {DEMO_INTERVAL} (against the real API: 5m). Ctrl-C stops the exporter and"
            " the simulator.",
        ]
    )


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 (our own loopback URL)
                return response.status == 200
        except OSError:
            time.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exporter.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--web.listen-address", dest="listen", default="127.0.0.1:19726")
    parser.add_argument("--simulator.listen-address", dest="simulator", default="127.0.0.1:19727")
    args = parser.parse_args(argv)
    simulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter.simulator",
            "--web.listen-address",
            args.simulator,
            # A month-to-date figure of a believable size, with decimals so it visibly moves.
            "--minutes-per-hour",
            "60",
            "--items-format",
            "dot",
            "--daily-limit",
            "0",
            # Its own start/stop lines would only bury the banner below.
            "--log.level",
            "warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not _wait_healthy(f"http://{args.simulator}/-/healthy", simulator):
            print(
                f"demo: the simulator could not start on {args.simulator} (port taken? run "
                f"python -m exporter.simulator --web.listen-address {args.simulator} to see why)",
                file=sys.stderr,
            )
            return 1
        print(banner(args.listen, args.simulator), file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="wolkvox-demo-") as tmp:
            config = Path(tmp) / "demo.yml"
            config.write_text(yaml.safe_dump(demo_config(f"http://{args.simulator}")), encoding="utf-8")
            return cli.main(["--config.file", str(config), "--web.listen-address", args.listen])
    finally:
        simulator.terminate()
        try:
            simulator.wait(timeout=5)
        except subprocess.TimeoutExpired:
            simulator.kill()


if __name__ == "__main__":
    sys.exit(main())
