"""The HTTP command and query paths against a bare Litestar app, under the same server.

Servers (each its own process, on 127.0.0.1):

- Almanac: ``almanac serve --roles api`` (or the same app under granian with ``--server
  granian``) on a fresh database. Before it starts, a full ``almanac serve`` generates one
  reading and stops, so the read model and the Redis cache hold a complete reading (chart
  and text, ~6.5 kB of JSON) and the API process runs alone, with no worker or projector
  taking CPU.
- Baseline: ``benchmarks/bare_app.py`` under the same server with the same settings,
  returning the same bodies (the same command Struct validated, the same ``ReadingView``).

Load (separate processes):

- Peak throughput and latency at saturation: wrk, 1 thread, 64 connections. POSTs carry a
  label that differs per request (a counter in the wrk Lua script) and no Idempotency-Key,
  so each POST appends a new reading and no cache can remember a body. Bare and Almanac
  runs alternate, ``rounds`` times, in the same server processes; the ratios use medians.
- Latency versus offered load: ``benchmarks/loadgen.py`` (fixed rate, open loop, latency
  from each request's scheduled time) at fractions of Almanac's measured peak, for both
  paths. The GET at 0.5 is the "p99 at half load" figure. Also plotted to a PNG.
- Memory: the API process's RSS when idle, after each round of load and after the sweep.
  The leak check judges the growth from the end of round 1 to the end of the last round
  (more than ``LEAK_TOLERANCE_MB`` is "grows") and gives it per request served.

Targets (DESIGN): POST >= 0.6 x bare; GET (cache hit) >= 0.7 x bare and p99 <= 5 ms at half
of peak load.

Run: ``python -m benchmarks api --seconds 3 [--profile embedded] [--server granian]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.appends import _database, _drop
from benchmarks.websocket import (
    BODY,
    _admin_key,
    _delete_stream,
    _free_port,
    _server_env,
    _start,
    _stop,
)

RESULTS = Path(__file__).parent / "results"
CONNECTIONS = 64
SWEEP = (0.1, 0.25, 0.5, 0.75, 0.9)
WRK = shutil.which("wrk")

_DONE = r"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\": %d, \"duration_us\": %d, \"connect_errors\": %d, "
    .. "\"read_errors\": %d, \"write_errors\": %d, \"status_errors\": %d, \"timeouts\": %d, "
    .. "\"p50_us\": %d, \"p90_us\": %d, \"p99_us\": %d, \"max_us\": %d}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _post_script(key: str) -> str:
    # The body with its label last, so that each request only appends a counter and `"}`.
    head = json.dumps({**BODY, "label": "bench-"})[:-2]
    return f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, [==[{head}]==] .. n .. '"}}')
end
{_DONE}"""


def _get_script(key: str) -> str:
    return f'wrk.headers["Authorization"] = "Bearer {key}"\n{_DONE}'


def wrk(base: str, path: str, script: str, seconds: float) -> dict[str, Any]:
    """One closed-loop wrk run: requests/s and latency percentiles (ms)."""
    assert WRK is not None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(script)
    try:
        out = subprocess.run(
            [
                WRK,
                "-t1",
                f"-c{CONNECTIONS}",
                f"-d{max(1, round(seconds))}s",
                "-s",
                lua.name,
                f"{base}{path}",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 30,
        ).stdout
    finally:
        Path(lua.name).unlink()
    raw = json.loads(next(line for line in out.splitlines() if line.startswith("WRKJSON "))[8:])
    errors = sum(v for k, v in raw.items() if k.endswith("errors") or k == "timeouts")
    return {
        "requests_per_s": raw["requests"] / (raw["duration_us"] / 1e6),
        "requests": raw["requests"],
        "errors": errors,
        **{k.replace("_us", "_ms"): v / 1000 for k, v in raw.items() if k.endswith("_us")},
    }


def loadgen(
    port: int, path: str, *, rate: float, seconds: float, key: str, body: Path | None
) -> dict[str, Any]:
    """One fixed-rate open-loop run (benchmarks/loadgen.py, its own process)."""
    argv = [
        sys.executable,
        "-m",
        "benchmarks.loadgen",
        "--port",
        str(port),
        "--path",
        path,
        "--rate",
        str(rate),
        "--seconds",
        str(seconds),
        "--connections",
        str(CONNECTIONS),
        "--header",
        f"Authorization: Bearer {key}",
    ]
    if body is not None:
        argv += ["--method", "POST", "--body-file", str(body)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 60)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (granian serves from a child)."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
    return total / 1024


async def _generated_reading(base: str, key: str) -> bytes:
    """POST a reading and wait (bounded) until it is generated; its GET body."""
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, timeout=10, headers=headers) as http:
        posted = await http.post("/api/v1/readings", json={**BODY, "label": "benchmark"})
        assert posted.status_code == 202, posted.text
        location = posted.headers["location"]
        for _ in range(600):
            got = await http.get(location)
            if got.status_code == 200 and got.json()["status"] == "generated":
                return got.content
            await asyncio.sleep(0.1)
    raise AssertionError("the reading was not generated within 60 s")


@contextlib.contextmanager
def _servers(profile: str, server: str) -> Iterator[dict[str, Any]]:
    """Almanac's API and the bare app, each in its own process, with a generated reading."""
    name, url = _database() if profile == "services" else ("", "")
    started: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = _server_env(profile, url, Path(tmp))
            key = _admin_key(env)
            port = _free_port()
            roles = "api,worker,projector" + (",relay" if profile == "services" else "")
            almanac = [sys.executable, "-m", "almanac", "serve", "--port", str(port)]
            setup = _start([*almanac, "--roles", roles], env, port)
            try:
                body = asyncio.run(_generated_reading(f"http://127.0.0.1:{port}", key))
            finally:
                _stop(setup)
            reading = Path(tmp) / "reading.json"
            reading.write_bytes(body)
            command = Path(tmp) / "command.json"
            command.write_text(json.dumps(BODY))
            if server == "granian":
                api = [sys.executable, "-m", "benchmarks.servers", "--roles", "api"]
            else:
                api = [*almanac, "--roles", "api"]
            started.append(_start([*api, "--port", str(port)], env, port))
            bare_port = _free_port()
            bare = [
                sys.executable,
                "-m",
                "benchmarks.bare_app",
                "--port",
                str(bare_port),
                "--reading",
                str(reading),
                "--server",
                server,
            ]
            started.append(_start(bare, env, bare_port))
            reading_id = json.loads(body)["id"]
            yield {
                "port": port,
                "bare_port": bare_port,
                "pid": started[0].pid,
                "key": key,
                "get_path": f"/api/v1/readings/{reading_id}",
                "body_bytes": len(body),
                "command_file": command,
            }
    finally:
        for process in started:
            _stop(process)
        if name:
            _drop(name)
            _drop(f"{name}_read")
            asyncio.run(_delete_stream(f"BENCH_{name}"))


def _median(runs: list[dict[str, Any]], field: str) -> float:
    return float(statistics.median(r[field] for r in runs))


def run(
    seconds: float = 3.0,
    profile: str = "services",
    server: str = "uvicorn",
    rounds: int = 3,
    pyspy: bool = False,
) -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": "api", "profile": profile, "server": server}
    if WRK is None:
        print("   wrk is not installed (apt-get install wrk): the api benchmark needs it")
        return {**result, "skipped": "wrk not found"}
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    with _servers(profile, server) as s:
        base, bare = f"http://127.0.0.1:{s['port']}", f"http://127.0.0.1:{s['bare_port']}"
        post_lua, get_lua = _post_script(s["key"]), _get_script(s["key"])
        # Warm up both processes (imports, caches, connection pools): one short run each.
        for target in (base, bare):
            wrk(target, "/api/v1/readings", post_lua, 1)
            wrk(target, s["get_path"], get_lua, 1)
        rss: dict[str, Any] = {"idle": rss_mb(s["pid"]), "after_round": []}
        runs: dict[str, list[dict[str, Any]]] = {
            k: [] for k in ("bare_post", "post", "bare_get", "get")
        }
        for round_ in range(rounds):
            runs["bare_post"].append(wrk(bare, "/api/v1/readings", post_lua, seconds))
            spy = _pyspy(s["pid"], "post", seconds) if pyspy and round_ == 0 else None
            runs["post"].append(wrk(base, "/api/v1/readings", post_lua, seconds))
            _finish(spy)
            runs["bare_get"].append(wrk(bare, s["get_path"], get_lua, seconds))
            spy = _pyspy(s["pid"], "get", seconds) if pyspy and round_ == 0 else None
            runs["get"].append(wrk(base, s["get_path"], get_lua, seconds))
            _finish(spy)
            rss["after_round"].append(rss_mb(s["pid"]))
            print(
                f"   round {round_ + 1}: POST bare {runs['bare_post'][-1]['requests_per_s']:,.0f}/s"
                f" almanac {runs['post'][-1]['requests_per_s']:,.0f}/s; GET bare "
                f"{runs['bare_get'][-1]['requests_per_s']:,.0f}/s almanac "
                f"{runs['get'][-1]['requests_per_s']:,.0f}/s; RSS "
                f"{rss['after_round'][-1]:.0f} MB"
            )
        peaks = {k: _median(v, "requests_per_s") for k, v in runs.items()}
        sweep: dict[str, list[dict[str, Any]]] = {"post": [], "get": []}
        length = min(seconds, 3.0)
        for fraction in SWEEP:
            for path_name, path, body in (
                ("post", "/api/v1/readings", s["command_file"]),
                ("get", s["get_path"], None),
            ):
                rate = round(peaks[path_name] * fraction)
                point = loadgen(s["port"], path, rate=rate, seconds=length, key=s["key"], body=body)
                sweep[path_name].append({"fraction_of_peak": fraction, **point})
        rss["after_sweep"] = rss_mb(s["pid"])
        rss["leak_check"] = leak_check(rss["after_round"], runs)
        result["get_body_bytes"] = s["body_bytes"]
    half = next(p for p in sweep["get"] if p["fraction_of_peak"] == 0.5)
    result.update(
        seconds_per_run=seconds,
        rounds=rounds,
        connections=CONNECTIONS,
        runs=runs,
        peaks_per_s=peaks,
        ratio_post=peaks["post"] / peaks["bare_post"],
        ratio_get=peaks["get"] / peaks["bare_get"],
        post_p50_ms=_median(runs["post"], "p50_ms"),
        post_p99_ms=_median(runs["post"], "p99_ms"),
        get_p50_ms=_median(runs["get"], "p50_ms"),
        get_p99_ms=_median(runs["get"], "p99_ms"),
        get_half_load={
            k: half.get(k)
            for k in ("offered_per_s", "achieved_per_s", "p50_ms", "p99_ms", "errors")
        },
        sweep=sweep,
        rss_mb=rss,
        loadavg_before=load_before,
        loadavg_after=Path("/proc/loadavg").read_text().split()[:3],
        targets={"ratio_post": 0.6, "ratio_get": 0.7, "get_half_load_p99_ms": 5},
    )
    _report(result)
    plot = plot_latency(result)
    if plot is not None:
        result["plot"] = str(plot)
    return result


def _pyspy(pid: int, name: str, seconds: float) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("   py-spy is not installed (pip install py-spy): no profile")
        return None
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"pyspy-{name}-{time.strftime('%Y%m%dT%H%M%S')}.txt"
    print(f"   profiling the {name.upper()} run: {out}")
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _finish(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        spy.wait(timeout=60)


def _report(r: dict[str, Any]) -> None:
    p, t = r["peaks_per_s"], r["targets"]
    # A load generator run that got no answers has no percentiles: shown as nan.
    half = {k: float("nan") if v is None else v for k, v in r["get_half_load"].items()}
    print(
        f"POST /api/v1/readings, {CONNECTIONS} connections: bare {p['bare_post']:,.0f}/s, "
        f"almanac {p['post']:,.0f}/s (p50 {r['post_p50_ms']:.1f} ms, p99 "
        f"{r['post_p99_ms']:.1f} ms); ratio {r['ratio_post']:.2f} (target >= {t['ratio_post']})"
    )
    print(
        f"GET /api/v1/readings/{{id}} (cache hit, {r['get_body_bytes']:,} B): bare "
        f"{p['bare_get']:,.0f}/s, almanac {p['get']:,.0f}/s (p50 {r['get_p50_ms']:.1f} ms, "
        f"p99 {r['get_p99_ms']:.1f} ms); ratio {r['ratio_get']:.2f} (target >= {t['ratio_get']})"
    )
    print(
        f"GET at half of peak ({half['offered_per_s']:,.0f}/s offered, "
        f"{half['achieved_per_s']:,.0f}/s achieved): p50 {half['p50_ms']:.2f} ms, p99 "
        f"{half['p99_ms']:.2f} ms (target <= 5 ms; ratio {half['p99_ms'] / 5:.2f})"
    )
    rss = r["rss_mb"]
    rounds = ", ".join(f"{v:.0f}" for v in rss["after_round"])
    print(
        f"API RSS: idle {rss['idle']:.0f} MB, after each round {rounds} MB, after the sweep "
        f"{rss['after_sweep']:.0f} MB; load average {' '.join(r['loadavg_before'])} before, "
        f"{' '.join(r['loadavg_after'])} after"
    )
    leak = rss["leak_check"]
    if "growth_mb" in leak:
        last = len(rss["after_round"])
        per_request = leak["bytes_per_request"]
        print(
            f"Leak check: {leak['growth_mb']:+.1f} MB from round 1 to round {last} over "
            f"{leak['requests']:,} requests ({per_request} B a request): {leak['verdict']} "
            f"(tolerance {leak['tolerance_mb']:.0f} MB)"
        )


LEAK_TOLERANCE_MB = 2.0


def leak_check(after_round: list[float], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """RSS growth from the first round's end to the last's, against the requests served in
    between: the first round fills the pools, caches and allocator arenas, so a process that
    does not leak stays within allocator noise (``LEAK_TOLERANCE_MB``) after it."""
    if len(after_round) < 2:
        return {"verdict": "needs two rounds or more"}
    growth = after_round[-1] - after_round[0]
    served = sum(run["requests"] for name in ("post", "get") for run in runs[name][1:])
    return {
        "growth_mb": round(growth, 1),
        "requests": served,
        "bytes_per_request": round(growth * 2**20 / served, 1) if served else None,
        "tolerance_mb": LEAK_TOLERANCE_MB,
        "verdict": "levels off" if growth <= LEAK_TOLERANCE_MB else "grows",
    }


def plot_latency(result: dict[str, Any], out: Path | None = None) -> Path | None:
    """Latency percentiles versus offered load, both paths, as a PNG (needs matplotlib)."""
    try:
        import matplotlib as mpl

        mpl.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("   matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    titles = {"post": "POST /api/v1/readings (command)", "get": "GET /api/v1/readings/{id} (query)"}
    for ax, (name, points) in zip(axes, result["sweep"].items(), strict=True):
        rates = [p["offered_per_s"] for p in points]
        for pct, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^-")):
            ax.plot(rates, [p.get(pct, float("nan")) for p in points], style, label=pct[:-3])
        ax.axvline(result["peaks_per_s"][name], color="grey", linestyle=":", label="wrk peak")
        if name == "get":
            ax.axhline(5, color="red", linestyle=":", label="p99 target")
        ax.set_yscale("log")
        ax.set_title(titles[name], fontsize=10)
        ax.set_xlabel("offered load (requests/s, open loop)")
        ax.set_ylabel("latency (ms)")
        ax.grid(visible=True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Almanac API latency vs offered load ({result['profile']} profile, "
        f"{result['server']}, {CONNECTIONS} connections, 2 shared cores)",
        fontsize=10,
    )
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    path = out or RESULTS / (
        f"latency-{result['profile']}-{result['server']}-{time.strftime('%Y%m%dT%H%M%S')}.png"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"   plot {path}")
    return path
