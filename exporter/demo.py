"""``python -m exporter.demo``: the exporter against the bundled simulator, no wolkvox token needed.

Starts the simulator on 127.0.0.1:19727 as a child process, writes a config with three demo operations
and the whole bill (several apis each, prices, minute and cost budgets, token_info reads), refreshed every
15 s instead of 5 m so the numbers move, and runs the exporter on 127.0.0.1:19726 in the foreground.
The simulator answers the first round as of the last minutes of the previous month, so a month closes
right away and the previous-month series have data too. Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from exporter import cli

# The simulator's month-to-date values grow by --minutes-per-hour (60) stereo_rec minutes an hour, about
# 45,000 in a month; the other usage apis at a fixed fraction of that; licences are a stable small number.
DEMO_OPERATIONS: list[dict[str, Any]] = [
    # Well inside both budgets: about 45,000 of 60,000 minutes and 580 of 1,000 USD at the month's end.
    {
        "name": "bogota",
        "server": "wv9901",
        "apis": ["stereo_rec", "ivr_minutes", "amd_ai", "chat_licenses"],
        "budget_minutes": 60000,
        "cost_budget": 1000,
        "labels": {"client": "acme"},  # bogota and lima are one client's (/statement?group=client)
    },
    # Forecast over both budgets (about 45,000 of 40,000 minutes, 600 of 500 USD): the forecast alerts.
    {
        "name": "lima",
        "server": "wv0042",
        "apis": ["stereo_rec", "ivr_calls", "agent_script"],
        "prices": {"stereo_rec": 0.0035},
        "budget_minutes": 40000,
        "cost_budget": 500,
        "labels": {"client": "acme"},
    },
    # No budget at all: the info alert WolkvoxStereoRecBudgetNotConfigured; priced, no cost budget.
    {"name": "medellin", "server": "wv0107", "labels": {"client": "globex"}},
]
# Demo prices, not wolkvox's: usage per unit, licences per licence per month.
DEMO_PRICES = {
    "stereo_rec": 0.004,
    "ivr_minutes": 0.01,
    "ivr_calls": 0.02,
    "amd_ai": 0.002,
    "chat_licenses": 15,
    "agent_script": 10,
}
DEMO_INTERVAL = "15s"
# The simulator runs with this daily limit per token (token_info reports it), and a 15 s pace makes at
# most 4 x 5,760 requests per token a day (plus 24 token_info reads): the config's own limit is the same,
# far above that.
DEMO_DAILY_REQUEST_LIMIT = 100_000
# The operation the banner's curl commands break and repair. Its token is the demo's own, fake one.
FAULT_OPERATION = "lima"


def demo_token(name: object) -> str:
    """The demo's fake token of an operation (the simulator accepts any token)."""
    return f"demo-token-{name}"


def demo_config(simulator_url: str) -> dict[str, object]:
    return {
        "refresh_interval": DEMO_INTERVAL,
        "daily_request_limit": DEMO_DAILY_REQUEST_LIMIT,
        "token_info_interval": "1h",
        "currency": "USD",
        "prices": DEMO_PRICES,
        "operations": [
            {**op, "token": demo_token(op["name"]), "base_url": simulator_url} for op in DEMO_OPERATIONS
        ],
    }


def fault_commands(simulator: str) -> tuple[str, str]:
    """Ready-to-paste curl commands: make FAULT_OPERATION's token refused (reason auth), and repair it."""
    token = demo_token(FAULT_OPERATION)
    body = json.dumps({"mode": "invalid_token", "token": token})
    fail = (
        f"curl -s -X POST -H 'Content-Type: application/json' -d {shlex.quote(body)} "
        f"http://{simulator}/-/faults"
    )
    recover = f"curl -s -X DELETE {shlex.quote(f'http://{simulator}/-/faults?token={token}')}"
    return fail, recover


def banner(listen: str, simulator: str) -> str:
    names = ", ".join(str(op["name"]) for op in DEMO_OPERATIONS)
    fail, recover = fault_commands(simulator)
    return "\n".join(
        [
            f"wolkvox-exporter demo: {len(DEMO_OPERATIONS)} operations ({names}) on the bundled simulator,"
            " no token needed.",
            f"  metrics:      http://{listen}/metrics",
            f"  landing page: http://{listen}/",
            f"  simulator:    http://{simulator}/-/stats (requests it answered; faults: POST /-/faults,"
            " see exporter/simulator/faults.py)",
            f"  statement:    http://{listen}/statement?group=client (usage and cost per client, this month)",
            "Prices, minute and cost budgets are set (USD, demo prices); the first round is answered as of"
            " last month's end, so a month closes at once.",
            f"Make {FAULT_OPERATION} fail (its token refused, reason auth; the demo's tokens are fake):",
            f"  {fail}",
            "and recover:",
            f"  {recover}",
            f"Refreshing every {DEMO_INTERVAL} (against the real API: 5m). Ctrl-C stops the exporter and"
            " the simulator.",
        ]
    )


def last_month_end(now: float) -> str:
    """Ten minutes before this month began (UTC), ISO 8601: the simulator's clock for the first round."""
    start = datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return datetime.fromtimestamp(start.timestamp() - 600, UTC).isoformat()


def _control(method: str, url: str, body: object = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 (our own loopback URL)
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        return json.load(response)


def _reports_answered(stats: object) -> bool:
    """True once the simulator has answered every report (operation x api) of the demo."""
    tokens = stats.get("tokens", {}) if isinstance(stats, dict) else {}
    for op in DEMO_OPERATIONS:
        apis = tokens.get(demo_token(op["name"]), {}).get("apis", {})
        if any(api not in apis for api in op.get("apis", ["stereo_rec"])):
            return False
    return True


def _close_the_month(simulator: str, stop: threading.Event) -> None:
    """Once the first round (as of last month's end) is answered, back to the real clock: the next round
    drops to this month's values, and the exporter closes last month."""
    while not stop.wait(0.2):
        try:
            if _reports_answered(_control("GET", f"http://{simulator}/-/stats")):
                _control("DELETE", f"http://{simulator}/-/clock")
                return
        except OSError:
            continue


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
    stop = threading.Event()
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
            str(DEMO_DAILY_REQUEST_LIMIT),
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
        try:
            _control("POST", f"http://{args.simulator}/-/clock", {"at": last_month_end(time.time())})
        except OSError as error:
            print(f"demo: cannot set the simulator's clock on {args.simulator}: {error}", file=sys.stderr)
            return 1
        closer = threading.Thread(target=_close_the_month, args=(args.simulator, stop), daemon=True)
        closer.start()
        print(banner(args.listen, args.simulator), file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="wolkvox-demo-") as tmp:
            config = Path(tmp) / "demo.yml"
            document = demo_config(f"http://{args.simulator}")
            document["state_store"] = str(Path(tmp) / "state.db")  # the store's metrics, /statement's months
            config.write_text(yaml.safe_dump(document), encoding="utf-8")
            return cli.main(["--config.file", str(config), "--web.listen-address", args.listen])
    finally:
        stop.set()
        simulator.terminate()
        try:
            simulator.wait(timeout=5)
        except subprocess.TimeoutExpired:
            simulator.kill()


if __name__ == "__main__":
    sys.exit(main())
