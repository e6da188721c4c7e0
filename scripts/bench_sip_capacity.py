"""SIP capacity through Kamailio: calls per second with callcredit against plain forwarding.

For each system and each offered rate, a fresh stack on loopback and one SIPp caller
(loadtest/sip/uac.xml) placing calls at that rate for --seconds, each call talking
--hold-seconds and hung up by the caller, to one SIPp callee (loadtest/sip/uas.xml):

  forward     Kamailio with integrations/kamailio/cnxcc.cfg -A WITHOUT_CREDIT_CONTROL: the
              same stateful, dialog-tracking proxy with no credit control;
  callcredit  Kamailio with integrations/kamailio/kamailio.cfg, the callcredit-kamailio
              adapter and callcredit-server (fresh SQLite journal, default durability):
              every INVITE waits for a durable reserve, every end is a durable release.
              All calls go to one account holding enough money (the hot account).

Per rate it prints the calls placed, answered and failed (SIPp's own failure count: a
timeout, a retransmission limit or an unexpected message; plus any refusal), and the call
set-up latency at the caller, INVITE to 180 and INVITE to 200, p50 / p99 / max. Latency
comes from the caller's message trace (microsecond timestamps: SIPp's own response-time
counters tick in 4 ms steps here). The highest rate with no failed call is the rate
sustained. The machine's load average at the start and its CPU use during each run are
printed with it: the callers, the callee, Kamailio, the adapter and the server share it.

    python scripts/bench_sip_capacity.py --rates 100,200,300 --seconds 30 --hold-seconds 3
    python scripts/bench_sip_capacity.py --systems forward --rates 50 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from callcredit.admin import AdminClient, RateSpec
from loadtest.baselines.procs import machine_cpu_seconds, process_cpu_seconds
from loadtest.sip_compare import (
    CNXCC_CFG,
    CURRENCY,
    PRICE_PER_MINUTE_MICROS,
    callcredit_proxy,
    callee,
    kamailio,
    missing_tools,
    parse_message_trace,
    run_caller,
    sipp_caller_argv,
    status_code,
    udp_port,
)

ACCOUNT = "capacity"
BALANCE = 10**12  # minor units: never the limit here
SYSTEMS = ("forward", "callcredit")
SETTLE_S = 2.0  # a fresh stack idles this long before the load starts
LEFTOVER_WAIT_S = 10.0  # the last releases after the last BYE
SHM_MB = 512  # Kamailio's shared memory: 64 MiB (its default) runs out at ~500 calls/s


@dataclass
class RateResult:
    system: str
    rate_per_s: int
    seconds: int
    placed: int
    answered: int
    failed: int  # SIPp's failed calls
    refused: int  # a final answer other than 200
    ringing_ms: tuple[float, float, float]  # p50, p99, max of INVITE -> 180
    answer_ms: tuple[float, float, float]  # p50, p99, max of INVITE -> 200
    machine_cpu_percent: float  # of both cores, 200% = all of the machine
    cpu_percent: dict[str, int]  # per process (Kamailio: all its processes), 100% = a core
    sipp_status: int
    left_open: str  # callcredit: "ok" when no call stayed open or held
    loadavg_1min: float  # the machine's, when this rate started

    @property
    def clean(self) -> bool:
        return (
            self.failed == 0
            and self.refused == 0
            and self.answered == self.placed
            and self.left_open in ("ok", "n/a")
        )


def percentiles(samples_ms: Sequence[float]) -> tuple[float, float, float]:
    """p50, p99 (nearest rank) and max; zeros for no samples."""
    if not samples_ms:
        return (0.0, 0.0, 0.0)
    ordered = sorted(samples_ms)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

    return (rank(0.50), rank(0.99), ordered[-1])


def setup_latency(trace: Path) -> tuple[int, int, list[float], list[float]]:
    """From a caller's message trace: INVITEs sent, final answers other than 200, and
    per call the ms from the first INVITE to the first 180 and to the 200."""
    invited: dict[str, float] = {}
    ringing: dict[str, float] = {}
    answered: dict[str, float] = {}
    refused = 0
    for message in parse_message_trace(trace):
        if message.sent:
            if message.first_line.startswith("INVITE "):
                invited.setdefault(message.call_id, message.at)
            continue
        if message.cseq_method != "INVITE" or message.call_id not in invited:
            continue
        code = status_code(message.first_line)
        if code == 180:
            ringing.setdefault(message.call_id, message.at)
        elif code == 200:
            answered.setdefault(message.call_id, message.at)
        elif code is not None and code >= 300:
            refused += 1
    ring_ms = [1000 * (at - invited[c]) for c, at in ringing.items()]
    answer_ms = [1000 * (at - invited[c]) for c, at in answered.items()]
    return len(invited), refused, ring_ms, answer_ms


def sipp_failed_calls(stat_csv: Path) -> int:
    """SIPp's cumulative failed-call count, from the last line of its -trace_stat file."""
    lines = stat_csv.read_text().splitlines() if stat_csv.exists() else []
    if len(lines) < 2:
        return -1
    header, last = lines[0].split(";"), lines[-1].split(";")
    return int(last[header.index("FailedCall(C)")])


@contextmanager
def proxy(system: str, workdir: Path) -> Iterator[tuple[int, str, dict[str, int]]]:
    """The system's stack with an untraced callee behind it; yields Kamailio's SIP port,
    callcredit's target ("" for forwarding) and the pids of its processes by role."""
    with ExitStack() as stack:
        if system == "forward":
            callee_ = stack.enter_context(callee(workdir / "callee", trace_messages=False))
            forwarder = stack.enter_context(
                kamailio(
                    CNXCC_CFG,
                    [
                        "WITHOUT_CREDIT_CONTROL",
                        f'NEXT_HOP="sip:127.0.0.1:{callee_.port}"',
                        f'CC_RPC="udp:127.0.0.1:{udp_port()}"',
                        "SIP_WORKERS=4",  # as kamailio.cfg's children
                    ],
                    workdir / "kamailio",
                    shm_mb=SHM_MB,
                )
            )
            yield forwarder.port, "", {"kamailio": forwarder.pid}
        else:
            callcredit = stack.enter_context(
                callcredit_proxy(workdir, trace_callee=False, shm_mb=SHM_MB)
            )
            asyncio.run(_setup(callcredit.target))
            yield callcredit.sip_port, callcredit.target, callcredit.pids


async def _left_open(target: str) -> str:
    """After the run: "ok" once the account has no call open and nothing held (every
    answered call released), waiting up to LEFTOVER_WAIT_S; else what is left."""
    deadline = time.monotonic() + LEFTOVER_WAIT_S
    async with AdminClient(target) as admin:
        while True:
            account = await admin.get_account(ACCOUNT)
            if account.active_calls == 0 and account.reserved == 0:
                return "ok"
            if time.monotonic() > deadline:
                return f"{account.active_calls} calls open, {account.reserved} held"
            await asyncio.sleep(0.5)


async def _setup(target: str) -> None:
    async with AdminClient(target) as admin:
        await admin.put_tariff("flat", CURRENCY, [RateSpec("", PRICE_PER_MINUTE_MICROS)])
        await admin.create_account(ACCOUNT, currency=CURRENCY, tariff_id="flat")
        await admin.top_up(ACCOUNT, BALANCE, idempotency_key="capacity")


def run_rate(system: str, rate: int, seconds: int, hold_s: float, workdir: Path) -> RateResult:
    calls = rate * seconds
    loadavg_1min = os.getloadavg()[0]
    with proxy(system, workdir) as (port, target, pids):
        time.sleep(SETTLE_S)
        argv = sipp_caller_argv(
            port,
            workdir,
            account=ACCOUNT,
            calls=calls,
            hold_s=hold_s,
            rate_per_s=rate,
            limit=math.ceil(rate * (hold_s + 10)),
            extra=["-trace_stat", "-stf", str(workdir / "caller_stat.csv"), "-fd", "1"],
        )
        # Each role's process with its descendants (Kamailio's workers, the projector).
        cpu_before = {role: process_cpu_seconds([pid]) for role, pid in pids.items()}
        busy_before, total_before = machine_cpu_seconds()
        started = time.monotonic()
        status = run_caller(argv, workdir)
        wall_s = time.monotonic() - started
        busy_after, total_after = machine_cpu_seconds()
        cpu_percent = {
            role: round(100 * (process_cpu_seconds([pid]) - cpu_before[role]) / wall_s)
            for role, pid in pids.items()
        }
        left = asyncio.run(_left_open(target)) if target else "n/a"
    placed, refused, ring_ms, answer_ms = setup_latency(workdir / "caller_messages.log")
    cpu = 100 * (os.cpu_count() or 1) * (busy_after - busy_before) / (total_after - total_before)
    return RateResult(
        system=system,
        rate_per_s=rate,
        seconds=seconds,
        placed=placed,
        answered=len(answer_ms),
        failed=sipp_failed_calls(workdir / "caller_stat.csv"),
        refused=refused,
        ringing_ms=percentiles(ring_ms),
        answer_ms=percentiles(answer_ms),
        machine_cpu_percent=round(cpu),
        cpu_percent=cpu_percent,
        sipp_status=status,
        left_open=left,
        loadavg_1min=round(loadavg_1min, 2),
    )


def table(results: Sequence[RateResult]) -> str:
    columns = (
        "system", "calls/s offered", "placed", "answered", "failed", "refused",
        "INVITE→180 p50 / p99 / max ms", "INVITE→200 p50 / p99 / max ms", "machine CPU",
        "CPU by process", "load average", "calls left open",
    )  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for r in results:
        ring = " / ".join(f"{v:.1f}" for v in r.ringing_ms)
        answer = " / ".join(f"{v:.1f}" for v in r.answer_ms)
        by_process = ", ".join(f"{role} {cpu}%" for role, cpu in r.cpu_percent.items())
        lines.append(
            f"| {r.system} | {r.rate_per_s} | {r.placed} | {r.answered} | {r.failed} | "
            f"{r.refused} | {ring} | {answer} | {r.machine_cpu_percent}% | {by_process} | "
            f"{r.loadavg_1min:.1f} | {r.left_open} |"
        )
    lines.append("")
    for system in dict.fromkeys(r.system for r in results):
        clean = [r.rate_per_s for r in results if r.system == system and r.clean]
        sustained = f"{max(clean)} calls/s" if clean else "none of the rates tried"
        lines.append(f"- {system}: sustained with 0 failed calls: {sustained}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="100,200,300", help="calls per second, in order")
    parser.add_argument("--seconds", type=int, default=30, help="how long each rate places calls")
    parser.add_argument("--hold-seconds", type=float, default=3.0, help="talk time per call")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--workdir", type=Path, help="keep traces and logs here")
    parser.add_argument("--json", type=Path, dest="json_path", help="also write the rows here")
    args = parser.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    if set(systems) - set(SYSTEMS):
        parser.error(f"--systems takes {', '.join(SYSTEMS)}")
    missing = missing_tools(["forward"])
    if missing:
        print(f"cannot run: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average at start: {load}; {os.cpu_count()} CPUs", file=sys.stderr)
    results = []
    with ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        # Systems alternate at each rate: on a shared machine, neighbouring runs see
        # about the same background load.
        for rate in (int(r) for r in args.rates.split(",") if r):
            for system in systems:
                result = run_rate(
                    system, rate, args.seconds, args.hold_seconds, workdir / f"{system}-{rate}"
                )
                print(f"{system} at {rate}/s: {result}", file=sys.stderr)
                results.append(result)
    print(f"load average at start: {load}")
    print(table(sorted(results, key=lambda r: (systems.index(r.system), r.rate_per_s))))
    if args.json_path is not None:
        rows = [{**asdict(r), "clean": r.clean, "loadavg_at_start": load} for r in results]
        args.json_path.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
