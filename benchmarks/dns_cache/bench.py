# Copyright: fleetkeeper.aws contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""DNS cache benchmark: the role's BIND against unbound, dnsmasq and the rate-limited upstream itself.

What it does (all on this machine, inside two network namespaces it makes and deletes):

- ``upstream`` namespace: BIND authoritative for ``bench.example`` (5,000 names,
  half with TTL 60 s, half 300 s), standing for the VPC resolver. An nftables
  rule inside that namespace drops UDP/53 packets above 1,024 per second
  (EC2's per-interface limit); nftables counters count what reaches the limit
  and what it drops.
- ``client`` namespace, linked to it by a veth pair (198.18.54.0/30, a
  benchmarking range that exists only inside the two namespaces): dnsperf and
  one cache at a time on 127.0.0.1:53, each with one worker thread: BIND 9.18
  (bookworm) and BIND 9.20 (bookworm-backports), each configured from the
  dns_cache role's own templates and defaults for its version, unbound 1.17
  and dnsmasq 2.90 (Debian packages unpacked by lab/dnsservers.py,
  never installed as services), plus ``direct``: dnsperf straight to the
  limited upstream. Both BIND targets run behind the role's upstream pacing
  (its default, ``auto``, is on wherever the host allows it): the role's own
  pacing script, rendered from its template, started in the client namespace
  before named and stopped after it; a variant with
  ``{"dns_cache_upstream_pacing": false}`` measures BIND without it.
- The server runs alone on CPU 0, dnsperf on CPU 1 (taskset, nice -10).
- Query mix: names drawn from a Zipf distribution (s=1.0) over the 5,000 names
  plus 250 names that do not exist (NXDOMAIN), shuffled so popularity and TTL
  are unrelated; the same file for every target.

The targets run interleaved for --rounds rounds (5), each started afresh: a
cold start at 25,000 q/s (failed queries, upstream queries and drops it
costs), priming, saturation throughput (no rate limit); in the last round
fixed offered loads with per-query latencies (dnsperf -v) for p50/p99, failed
queries (lost + every answer but NOERROR/NXDOMAIN), upstream queries per
second (nftables counter) and the cache hit ratio (BIND: statistics channel
through dns_cache_stats' parser; unbound: unbound-control; dnsmasq:
hits.bind/misses.bind). The summary gives median and range per target and the
per-round BIND/unbound ratios; a computed floor for cold-start failures (a
perfectly paced model cache) is stored beside them.

Run as root from the repository root (needs ip, nft, dnsperf, dig, taskset):

    .venv/bin/python benchmarks/dns_cache/bench.py            # full run, ~15-20 min
    .venv/bin/python benchmarks/dns_cache/bench.py --quick    # 2 rounds of 3 s phases, for development
    .venv/bin/python benchmarks/dns_cache/bench.py --targets bind --phases cold --loads none \
        --variant 'fps64={"dns_cache_fetches_per_server": 64}'    # a tuning experiment
    .venv/bin/python benchmarks/dns_cache/bench.py --variant 'unpaced={"dns_cache_upstream_pacing": false}' \
        --variant-phases cold,saturation                          # the recorded run (docs/performance.md)

Writes benchmarks/results/dns_cache.json and dns_cache.png (matplotlib from
requirements-bench.txt).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, ".build", "collections")]

from lab import dnsservers  # noqa: E402
from lab.dnscache import CacheServer  # noqa: E402

from ansible_collections.fleetkeeper.aws.plugins.module_utils import dns_cache_stats  # noqa: E402

ZONE = "bench.example"
UP_ADDR, CLIENT_ADDR = "198.18.54.2", "198.18.54.1"
LIMIT_PPS = 1024
# Cores: the server under test alone on one, dnsperf (and the upstream, busy only
# while a cache fills) on the other. Both at nice -10, so that other work on a
# shared machine takes less of the phases (each a few seconds long).
SERVER_CPU = ("nice", "-n", "-10", "taskset", "-c", "0")
CLIENT_CPU = ("nice", "-n", "-10", "taskset", "-c", "1")
DEFAULT_OUTPUT = os.path.join(ROOT, "benchmarks", "results", "dns_cache.json")
NAMES, NX_NAMES = 5000, 250


def make_records():
    return {"n%05d" % i: (60 if i % 2 == 0 else 300, "192.0.2.%d" % (i % 250 + 1)) for i in range(NAMES)}


def make_queries(path: str, count: int, seed: int = 8) -> dict:
    rng = random.Random(seed)
    population = ["n%05d.%s" % (i, ZONE) for i in range(NAMES)] + ["nx%04d.%s" % (i, ZONE) for i in range(NX_NAMES)]
    rng.shuffle(population)  # popularity independent of TTL and of existence
    weights = [1.0 / (rank + 1) for rank in range(len(population))]
    picks = rng.choices(population, weights=weights, k=count)
    with open(path, "w", encoding="utf-8") as handle:
        for name in picks:
            handle.write("%s A\n" % name)
    with open(path + ".all", "w", encoding="utf-8") as handle:
        for name in population:
            handle.write("%s A\n" % name)
    nx = sum(1 for name in picks if name.startswith("nx"))
    return {"queries_in_file": count, "distinct_names": len(set(picks)), "nxdomain_share": round(nx / count, 4),
            "population": len(population), "zipf_s": 1.0}


def paced_cache_floor(queries: str, rate: int, seconds: int, limit: int = LIMIT_PPS, burst: int = 100,
                      timeout: float = 2.0) -> dict:
    """Failures in the cold-start phase of a model cache that paces itself perfectly (computed, not measured).

    The model replays the same query file at ``rate`` for ``seconds``: each name's first miss joins a
    FIFO queue; the queue is sent upstream exactly as fast as the limit's token bucket (``limit`` per
    second, ``burst``) allows, so nothing is ever dropped or retried; an upstream answer is instant; a
    client query fails when its name's answer comes more than ``timeout`` after it was asked. This is
    the floor for any cache that asks each name once and never exceeds the limit: a real server that
    sends faster loses packets to the limit, one that refuses (fetch quotas) fails the refused queries.
    """
    with open(queries, encoding="utf-8") as handle:
        names = [line.split()[0] for line in itertools.islice(handle, rate * seconds)]
    answered: dict = {}  # name -> time its answer arrived
    queued: set = set()
    queue: list = []
    misses: list = []  # (name, time asked) of queries that found no answer
    head, tokens, last = 0, float(burst), 0.0
    for i, name in enumerate(names):
        now = i / rate
        tokens = min(float(burst), tokens + (now - last) * limit)
        last = now
        while head < len(queue) and tokens >= 1:
            answered[queue[head]] = now
            head, tokens = head + 1, tokens - 1
        if name in answered:
            continue
        if name not in queued:
            queued.add(name)
            queue.append(name)
        misses.append((name, now))
    end = len(names) / rate
    while head < len(queue):  # the rest of the queue drains after the phase
        end += 1.0 / limit
        answered[queue[head]] = end
        head += 1
    failed = sum(1 for name, asked in misses if answered[name] - asked > timeout)
    return {"model": "perfectly paced FIFO cache, %d/s burst %d, instant upstream, %.0f s client timeout"
                     % (limit, burst, timeout),
            "queries": len(names), "failed": failed, "failed_share": round(failed / len(names), 5),
            "upstream_queries": len(queue)}


class Target:
    name = ""
    server = "127.0.0.1"

    def start(self):
        pass

    def stop(self):
        pass

    def cache_counters(self):
        """(hits, misses) so far, or None where there is no cache."""
        return None


class BindTarget(Target):
    """BIND configured from the role's own templates and defaults (plus --bind-option overrides)."""

    name = "bind"

    def __init__(self, ns, work, overrides=None, name="bind", root=None):
        self.ns, self.work, self.overrides = ns, work, overrides or {}
        self.name, self.root = name, root or dnsservers.SERVER_ROOT
        self.version = dnsservers.named_version(self.root)

    server_proc = None

    def start(self):
        # Rendered once (an ansible-playbook run); every start after that is named again on the same
        # files, with an empty cache (BIND keeps its cache in memory only).
        if self.server_proc is not None:
            self.server_proc.start()
            return
        workdir = os.path.join(self.work, self.name)
        # Upstream pacing as the role sets it up (its default, auto, is on wherever the host allows it, as
        # this namespace does), unless the variant turns it off.
        pacing = str(self.overrides.get("dns_cache_upstream_pacing", "auto")).lower() not in ("false", "no", "off", "0")
        self.server_proc = CacheServer(self.ns, workdir,
                                       dict({"dns_cache_upstreams": [{"address": UP_ADDR, "port": 53}]},
                                            **self.overrides), threads=1, root=self.root, wrapper=SERVER_CPU,
                                       pacing=pacing)

    def stop(self):
        self.server_proc.stop()

    def cache_counters(self):
        raw = dnsservers.fetch_in_ns(self.ns, "http://127.0.0.1:954/json/v1/server")
        summary = dns_cache_stats.summarize(dns_cache_stats.parse_json(raw))
        return summary["cache_hits"], summary["cache_misses"]


class UnboundTarget(Target):
    name = "unbound"

    def __init__(self, ns, work):
        self.ns, self.dir = ns, os.path.join(work, "unbound")
        os.makedirs(self.dir, exist_ok=True)
        self.conf = os.path.join(self.dir, "unbound.conf")
        with open(self.conf, "w", encoding="utf-8") as handle:
            handle.write("""server:
  interface: 127.0.0.1
  port: 53
  num-threads: 1
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "%(dir)s"
  pidfile: "%(dir)s/unbound.pid"
  use-syslog: no
  logfile: ""
  verbosity: 0
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  module-config: "iterator"
  msg-cache-size: 64m
  rrset-cache-size: 128m
  prefetch: yes
  serve-expired: yes
  serve-expired-client-timeout: 900
  cache-max-negative-ttl: 300
  minimal-responses: yes
remote-control:
  control-enable: yes
  control-interface: 127.0.0.1
  control-port: 8953
  control-use-cert: no
forward-zone:
  name: "."
  forward-addr: %(up)s@53
""" % {"dir": self.dir, "up": UP_ADDR})

    def start(self):
        self.proc = self.ns.popen([*SERVER_CPU, dnsservers.binary_path("unbound"), "-d", "-c", self.conf],
                                  stdout=open(os.path.join(self.dir, "log"), "w", encoding="utf-8"),  # noqa: SIM115
                                  stderr=subprocess.STDOUT)
        dnsservers.wait_udp_dns(self.ns, "127.0.0.1", 53)

    def stop(self):
        self.ns.stop(self.proc)

    def cache_counters(self):
        out = self.ns.run([dnsservers.binary_path("unbound-control"), "-c", self.conf, "stats_noreset"],
                          env=dnsservers.server_env()).stdout
        values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        hits = int(values.get("total.num.cachehits", 0))
        return hits, int(values.get("total.num.cachemiss", 0))


class DnsmasqTarget(Target):
    name = "dnsmasq"

    def __init__(self, ns, work):
        self.ns, self.dir = ns, os.path.join(work, "dnsmasq")
        os.makedirs(self.dir, exist_ok=True)

    def start(self):
        self.proc = self.ns.popen([*SERVER_CPU, dnsservers.binary_path("dnsmasq"), "-k", "--conf-file=/dev/null", "--no-resolv",
                                   "--no-hosts", "--server=%s" % UP_ADDR, "--listen-address=127.0.0.1",
                                   "--bind-interfaces", "--port=53", "--cache-size=10000", "--user=root",
                                   "--pid-file=%s/pid" % self.dir],
                                  stdout=open(os.path.join(self.dir, "log"), "w", encoding="utf-8"),  # noqa: SIM115
                                  stderr=subprocess.STDOUT)
        dnsservers.wait_udp_dns(self.ns, "127.0.0.1", 53)

    def stop(self):
        self.ns.stop(self.proc)

    def cache_counters(self):
        def chaos(name):
            out = self.ns.run(["dig", "+short", "+tries=1", "+time=2", "@127.0.0.1", "CHAOS", "TXT", name]).stdout
            return int(out.strip().strip('"') or 0)
        return chaos("hits.bind"), chaos("misses.bind")


class DirectTarget(Target):
    name = "direct"
    server = UP_ADDR


LINE = re.compile(r"^> (\S+) .* ([0-9.]+)$")


def dnsperf(ns, target, queries, duration, qps=None, verbose=False, runs=None):
    # At a fixed offered load the window must hold every query that goes unanswered
    # for the 2 s timeout, or dnsperf stops offering (it waits for a free slot).
    window = min(65000, max(500, int(qps * 2.2))) if qps else 500
    # Two client threads: with one, dnsperf itself could not send, receive and (with -v) print 50,000
    # queries a second on this machine, and lost about 7% of them whichever server answered.
    argv = [*CLIENT_CPU, "dnsperf", "-s", target.server, "-d", queries, "-l", str(duration), "-t", "2", "-q", str(window),
            "-c", "4", "-T", "2"]
    if qps:
        argv += ["-Q", str(qps)]
    if runs:
        argv += ["-n", str(runs)]
    if verbose:
        argv.append("-v")
    proc = ns.run(argv, check=False)
    text = proc.stdout
    result = {}
    for key, pattern in (("sent", r"Queries sent:\s+(\d+)"), ("completed", r"Queries completed:\s+(\d+)"),
                         ("lost", r"Queries lost:\s+(\d+)"), ("qps", r"Queries per second:\s+([0-9.]+)"),
                         ("avg_latency_s", r"Average Latency \(s\):\s+([0-9.]+)")):
        match = re.search(pattern, text)
        result[key] = float(match.group(1)) if match else 0.0
    rcodes = {}
    if "Response codes:" in text:
        line = text.split("Response codes:")[-1].splitlines()[0]
        rcodes = {code: int(n) for code, n in re.findall(r"([A-Z]+) (\d+) \(", line)}
    result["rcodes"] = rcodes
    # Failed: no answer within the timeout, or an answer other than the two a client can use
    # (NOERROR; NXDOMAIN for the names that do not exist): SERVFAIL, but also REFUSED from a server
    # that refuses what it cannot forward at once.
    result["failed"] = int(result["lost"]) + sum(n for code, n in rcodes.items() if code not in ("NOERROR", "NXDOMAIN"))
    if verbose:
        latencies = sorted(float(m.group(2)) for m in map(LINE.match, text.splitlines()) if m)
        if latencies:
            result["p50_ms"] = round(latencies[len(latencies) // 2] * 1000, 3)
            result["p99_ms"] = round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 3)
    if proc.returncode != 0 and not result["sent"]:
        raise RuntimeError("dnsperf failed: %s %s" % (text[-2000:], proc.stderr[-2000:]))
    return result


def measure(ns_client, ns_up, target, queries, args, loads=(), phases=None):
    """One round for one target, started afresh (cold): cold start, priming, saturation, then ``loads``."""
    phases = args.phases if phases is None else phases
    out = {"target": target.name, "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    target.start()
    try:
        def snapshot():
            offered, dropped = dnsservers.limit_counters(ns_up)
            return {"up_offered": offered, "up_dropped": dropped, "cache": target.cache_counters(),
                    "t": time.monotonic()}

        def delta(before, after, run):
            seconds = after["t"] - before["t"]
            item = dict(run)
            item["upstream_queries"] = after["up_offered"] - before["up_offered"]
            item["upstream_qps"] = round((after["up_offered"] - before["up_offered"]) / seconds, 1)
            item["upstream_dropped"] = after["up_dropped"] - before["up_dropped"]
            item["upstream_share_of_offered"] = (round((after["up_offered"] - before["up_offered"]) / run["sent"], 5)
                                                 if run["sent"] else None)
            item["failed_share"] = round(run["failed"] / run["sent"], 5) if run["sent"] else None
            if before["cache"] is not None:
                hits = after["cache"][0] - before["cache"][0]
                misses = after["cache"][1] - before["cache"][1]
                item["hit_ratio"] = round(hits / (hits + misses), 4) if hits + misses else None
            return item

        if target.name != "direct":
            before = snapshot()
            run = dnsperf(ns_client, target, queries, args.warmup, qps=25000)
            out["cold_start"] = delta(before, snapshot(), run)
            if "saturation" not in phases and not loads:
                return out
            # Then every name once, under the upstream's limit, so that saturation and the
            # fixed loads measure a warm cache (the steady state of a long-running host).
            prime = dnsperf(ns_client, target, queries + ".all", 60, qps=900, runs=1)
            out["priming"] = {"sent": prime["sent"], "failed": prime["failed"]}
        if "saturation" in phases:
            before = snapshot()
            run = dnsperf(ns_client, target, queries, args.duration)
            out["saturation"] = delta(before, snapshot(), run)
        if loads:
            out["loads"] = []
        for load in loads:
            before = snapshot()
            run = dnsperf(ns_client, target, queries, args.duration, qps=load, verbose=True)
            item = delta(before, snapshot(), run)
            item["offered_qps"] = load
            out["loads"].append(item)
            print("  %-8s %6d q/s offered: %8.0f done, p50 %s ms, p99 %s ms, failed %d, upstream %.0f q/s, hit %s"
                  % (target.name, load, run["qps"], item.get("p50_ms"), item.get("p99_ms"), item["failed"],
                     item["upstream_qps"], item.get("hit_ratio")), flush=True)
    finally:
        target.stop()
    return out


def spread(values) -> dict | None:
    """Median and range of a list of numbers (None when empty)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return {"median": round(statistics.median(values), 4), "min": round(values[0], 4),
            "max": round(values[-1], 4), "n": len(values)}


def summarize(results) -> dict:
    """Per target: median and range over the rounds of saturation q/s, cold-start failures and upstream
    queries; and the per-round ratio of each BIND to unbound (paired within a round, so the load other
    work puts on the machine at that moment hits both sides)."""
    summary = {}
    by_target: dict = {}
    for rnd in results["rounds"]:
        for res in rnd["targets"]:
            by_target.setdefault(res["target"], []).append(res)
    for name, runs in by_target.items():
        item = {}
        if any("saturation" in r for r in runs):
            item["saturation_qps"] = spread(r["saturation"]["qps"] for r in runs if "saturation" in r)
        if any("cold_start" in r for r in runs):
            item["cold_start_failed_share"] = spread(r["cold_start"]["failed_share"] for r in runs
                                                     if "cold_start" in r)
            item["cold_start_upstream_queries"] = spread(r["cold_start"]["upstream_queries"] for r in runs
                                                         if "cold_start" in r)
            item["cold_start_upstream_dropped"] = spread(r["cold_start"]["upstream_dropped"] for r in runs
                                                         if "cold_start" in r)
        summary[name] = item
    ratios = {}
    for name in by_target:
        if not name.startswith("bind") or "unbound" not in by_target:
            continue
        per_round = []
        for rnd in results["rounds"]:
            sat = {r["target"]: r["saturation"]["qps"] for r in rnd["targets"] if "saturation" in r}
            if name in sat and sat.get("unbound"):
                per_round.append(sat[name] / sat["unbound"])
        if per_round:
            ratios["%s_vs_unbound_saturation" % name] = spread(per_round)
    summary["ratios"] = ratios
    return summary


def load_runs(results) -> list:
    """The fixed-load series (run in the last round), one entry per target."""
    return [res for rnd in results["rounds"] for res in rnd["targets"] if res.get("loads")]


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -r requirements-bench.txt): no plot")
        return
    fig, ((ax1, ax2), (ax3, ax4)) = plt.subplots(2, 2, figsize=(12, 9))
    names = [res["target"] for res in results["rounds"][0]["targets"]]  # run order, one colour per target
    colour = {name: "C%d" % i for i, name in enumerate(names)}
    for res in load_runs(results):
        loads = [item["offered_qps"] for item in res["loads"]]
        ax1.plot(loads, [max(item["failed"] / max(item["sent"], 1) * 100, 0.001) for item in res["loads"]],
                 marker="o", label=res["target"], color=colour[res["target"]])
        ax2.plot(loads, [max(item["upstream_qps"], 0.1) for item in res["loads"]], marker="o", label=res["target"],
                 color=colour[res["target"]])
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (queries/s)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_ylabel("failed queries (% of sent; 0 drawn at 0.001)")
    ax1.set_title("Failed queries (lost, SERVFAIL, REFUSED), warm cache, last round")
    ax2.axhline(LIMIT_PPS, color="grey", linestyle="--", label="upstream limit")
    ax2.set_ylabel("queries/s reaching the upstream")
    ax2.set_title("Upstream load (limit %d packets/s)" % LIMIT_PPS)
    for ax, key, title, scale in (
            (ax3, "saturation", "Saturation throughput per round (bar: median)", 1.0),
            (ax4, "cold_start", "Cold start: failed %% of client queries, first %d s at 25,000 q/s"
             % results["warmup_seconds"], 100.0)):
        for pos, name in enumerate(names):
            values = [r[key]["failed_share" if key == "cold_start" else "qps"] * scale
                      for rnd in results["rounds"] for r in rnd["targets"] if r["target"] == name and key in r]
            if not values:
                continue
            ax.scatter([pos] * len(values), values, alpha=0.6, color=colour[name])
            ax.hlines(statistics.median(values), pos - 0.3, pos + 0.3, color="black")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    ax3.set_ylabel("queries/s answered")
    ax4.set_yscale("log")  # 1 % next to 50 %: the target line must stay readable
    ax4.set_ylabel("failed (% of sent, log scale)")
    ax4.axhline(1.0, color="grey", linestyle="--", label="target 1%")
    if results.get("cold_start_floor_model"):
        ax4.axhline(results["cold_start_floor_model"]["failed_share"] * 100, color="green", linestyle=":",
                    label="perfectly paced model cache (computed)")
    for ax in (ax1, ax2, ax4):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fmt(item, fmt="%.0f", scale=1.0) -> str:
    if not item:
        return "-"
    return (fmt + " (" + fmt + "-" + fmt + ")") % (item["median"] * scale, item["min"] * scale, item["max"] * scale)


def markdown(results) -> str:
    """The figures as Markdown tables (written into RESULTS.md between its figure markers)."""
    versions = ", ".join("%s = BIND %s" % (k, v) for k, v in sorted(results["bind_versions"].items()))
    out = ["Run: %s, %s, %d CPUs (server pinned to CPU 0, dnsperf to CPU 1), %d rounds with the targets "
           "interleaved, %d s per phase, one worker thread per server, upstream limit %d packets/s. "
           "Load average at the start of the rounds %s-%s (other work on the machine)."
           % (results.get("date", "?"), versions, results["cpus"], len(results["rounds"]), results["phase_seconds"],
              results["upstream_limit_pps"], results["load_average_range"][0], results["load_average_range"][1]),
           "", "Median (min-max) over the rounds.", ""]
    out += ["| target | saturation q/s | cold start: failed %% (first %d s at 25,000 q/s) | cold start: upstream "
            "queries | cold start: dropped by the limit |" % results["warmup_seconds"], "|---|---:|---:|---:|---:|"]
    for name, item in results["summary"].items():
        if name == "ratios":
            continue
        out.append("| %s | %s | %s | %s | %s |" % (
            name, _fmt(item.get("saturation_qps")), _fmt(item.get("cold_start_failed_share"), "%.2f", 100.0),
            _fmt(item.get("cold_start_upstream_queries")), _fmt(item.get("cold_start_upstream_dropped"))))
    if results["summary"].get("ratios"):
        out += ["", "| ratio at saturation (per round) | median (min-max) |", "|---|---:|"]
        for name, item in results["summary"]["ratios"].items():
            out.append("| %s | %s |" % (name.replace("_saturation", "").replace("_", " "), _fmt(item, "%.3f")))
    runs = load_runs(results)
    if runs:
        out += ["", "Fixed offered loads (last round, warm cache):", "",
                "| target | offered q/s | answered q/s | p50 ms | p99 ms | failed (% of sent) | upstream q/s "
                "(% of offered) | dropped by the limit | hit ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for res in runs:
        for item in res["loads"]:
            share = item.get("upstream_share_of_offered")
            out.append("| %s | %d | %.0f | %s | %s | %d (%.2f%%) | %.1f (%s) | %d | %s |" % (
                res["target"], item["offered_qps"], item["qps"], item.get("p50_ms", "-"), item.get("p99_ms", "-"),
                item["failed"], 100.0 * item["failed"] / max(item["sent"], 1), item["upstream_qps"],
                "%.3f%%" % (100 * share) if share is not None else "-", item["upstream_dropped"],
                item.get("hit_ratio", "-") if item.get("hit_ratio") is not None else "-"))
    return "\n".join(out) + "\n"


def update_results_md(results, path) -> None:
    begin, end = "<!-- figures: written by bench.py -->", "<!-- /figures -->"
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(head + begin + "\n" + markdown(results) + end + tail)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s phases and fewer loads, for development")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (every target once per round)")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--phases", default="cold,saturation",
                        help="cold (always, for caches) and saturation; fixed loads follow in the last round")
    parser.add_argument("--loads", default="500,1000,2000,5000,10000,25000,50000",
                        help="offered loads in queries/s (last round only), comma-separated, or none")
    parser.add_argument("--targets", default="bind,bind920,unbound,dnsmasq,direct",
                        help="bind (bookworm's 9.18), bind920 (bookworm-backports' 9.20), unbound, dnsmasq, direct")
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--bind-option", action="append", default=[],
                        help="extra role variable for BIND as name=json-value (tuning experiments)")
    parser.add_argument("--variant", action="append", default=[],
                        help="one more BIND 9.18 target, interleaved with the others, as NAME=json-object of role "
                             "variables (e.g. 'fps64={\"dns_cache_fetches_per_server\": 64}'); "
                             "NAME@920=... runs BIND 9.20")
    parser.add_argument("--variant-phases", default="cold",
                        help="phases for the variants: cold, or cold,saturation (no fixed loads)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.rounds = 3, 3, 2
        args.loads = "1000,10000,50000"
    args.loads = [] if args.loads == "none" else [int(x) for x in args.loads.split(",")]
    args.phases = args.phases.split(",")
    if os.geteuid() != 0:
        sys.exit("run as root (network namespaces)")
    # SIGTERM (timeout, kill) unwinds through the finally below: namespaces and servers go too.
    signal.signal(signal.SIGTERM, lambda *_args: sys.exit("terminated"))
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs two CPUs: the server on one, dnsperf on the other")
    for tool in ("dnsperf", "nft", "dig", "ip", "taskset"):
        if not shutil.which(tool):
            sys.exit("%s is missing (Debian packages dnsperf, nftables, bind9-dnsutils, iproute2, util-linux)" % tool)
    names = args.targets.split(",")
    dnsservers.fetch_servers()
    if "bind920" in names:
        dnsservers.fetch_bind_backports()
    overrides = {}
    for item in args.bind_option:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value)
    work = tempfile.mkdtemp(prefix="fk-dns-bench-")
    queries = os.path.join(work, "queries.txt")
    mix = make_queries(queries, 1000000)
    floor = paced_cache_floor(queries, 25000, args.warmup)
    client = dnsservers.Netns("bc")
    upstream_ns = dnsservers.Netns("bu")
    results = {"tool": "dnsperf 2.10 (-c 4 -T 2 -t 2; -q 500 at saturation, 2.2 x load at fixed loads)",
               "bind_versions": {}, "query_mix": mix, "upstream_limit_pps": LIMIT_PPS,
               "phase_seconds": args.duration, "warmup_seconds": args.warmup, "worker_threads": 1,
               "pinning": {"server": " ".join(SERVER_CPU), "client": " ".join(CLIENT_CPU)},
               "bind_overrides": overrides, "cpus": os.cpu_count(), "cold_start_floor_model": floor,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": []}
    try:
        dnsservers.veth_link(client, upstream_ns, CLIENT_ADDR, UP_ADDR)
        upstream = dnsservers.AuthServer(upstream_ns, UP_ADDR, ZONE, make_records(), workdir=os.path.join(work, "up"),
                                         threads=1, wrapper=CLIENT_CPU)
        dnsservers.limit_udp53(upstream_ns, LIMIT_PPS, 100)
        makers = {"bind": lambda: BindTarget(client, work, overrides),
                  "bind920": lambda: BindTarget(client, work, overrides, "bind920", dnsservers.BPO_ROOT),
                  "unbound": lambda: UnboundTarget(client, work),
                  "dnsmasq": lambda: DnsmasqTarget(client, work), "direct": DirectTarget}
        targets = [makers[name]() for name in names]
        results["variants"] = {}
        for item in args.variant:
            label, value = item.split("=", 1)
            root = dnsservers.SERVER_ROOT
            if label.endswith("@920"):
                label, root = label[:-4] + "-920", dnsservers.BPO_ROOT
                dnsservers.fetch_bind_backports()
            results["variants"]["bind-" + label] = json.loads(value)
            targets.append(BindTarget(client, work, dict(overrides, **json.loads(value)), "bind-" + label, root))
        for target in targets:
            if isinstance(target, BindTarget):
                results["bind_versions"][target.name] = target.version
        for number in range(args.rounds):
            last = number == args.rounds - 1
            rnd = {"round": number + 1, "targets": []}
            for target in targets:
                print("== round %d: %s" % (number + 1, target.name), flush=True)
                variant = target.name in results["variants"]
                res = measure(client, upstream_ns, target, queries, args, loads=args.loads if last and not variant else (),
                              phases=args.variant_phases.split(",") if variant else None)
                print("  cold failed %s, saturation %s q/s, load %s" % (
                    res.get("cold_start", {}).get("failed_share"), res.get("saturation", {}).get("qps"),
                    res["load_average_at_start"]), flush=True)
                rnd["targets"].append(res)
            results["rounds"].append(rnd)
        upstream.stop()
    finally:
        client.close()
        upstream_ns.close()
        shutil.rmtree(work, ignore_errors=True)
    loads = [r["load_average_at_start"][0] for rnd in results["rounds"] for r in rnd["targets"]]
    results["load_average_range"] = [min(loads), max(loads)]
    results["summary"] = summarize(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, sort_keys=True)
        handle.write("\n")
    plot(results, os.path.splitext(args.output)[0] + ".png")
    if args.output == DEFAULT_OUTPUT:
        update_results_md(results, os.path.join(ROOT, "benchmarks", "dns_cache", "RESULTS.md"))
    print(markdown(results))
    print("wrote", args.output)


if __name__ == "__main__":
    main()
