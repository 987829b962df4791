"""The benchmark of the exporter, run by ``benchmarks/run.py`` (its docstring says what is measured).

One job per module:
    cli        the flags (into an ``Options``) and ``main``: the parts in order, results written out
    options    ``Options`` (the parsed flags) and ``Bench`` (what every run is handed)
    processes  the children (started through tests/harness.py, all stopped at the end) and /proc readings
    servers    starting the simulator, the exporter, nginx and the prometheus_client reference; /metrics
    load       wrk: running it, parsing its report, the CPU used meanwhile
    machine    the machine the run took place on, and how busy it was without us
    metrics    part 1: /metrics per size (hanging upstreams, steady, idle CPU, refresher active)
    refresh    part 2: refresh capacity and pacing runs, scrape bursts, what upstream saw
    goals      the goals against what the run measured
    tables     the Markdown tables
    results    the typed results and their JSON form (benchmarks/results.json)

Needs the repository root and tests/ on ``sys.path`` (run.py puts them there): it imports the exporter's
defaults and tests/harness.py.
"""
