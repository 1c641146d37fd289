"""How long a killed driver's local Ray processes live on, and whether the next search minds them.

Usage: python experiments/ray_linger.py --out /tmp/linger [--max 300]

Starts `capsearch run` on a micro spec (one trial of the random tiny model, long enough to be killed
mid-training), waits until the trial trains, lists the driver's descendant processes (Ray's GCS server,
raylet, dashboard agents, workers), SIGKILLs the driver alone, then checks every second which of them
are still alive, up to --max seconds. With --next-at-once the second search (a fresh folder) starts
right after the kill, as a user's next command would (capsearch.search.cluster reaps the leftovers when it
starts Ray); otherwise after the watch. Writes OUT/linger.json and prints one line per process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

MICRO = {
    "name": "linger",
    "model": "tiny:random",
    "data": {"phantom": {"patients": 12, "size": 32, "seed": 0}},
    "train": {"steps": 400, "batch_size": 4, "probe_every": 0},
    "evaluate": {
        "n_prompts": 2,
        "n_per_prompt": 1,
        "steps": 2,
        "extraction_prompts": 0,
        "strength_prompts": 1,
        "strength_n": 1,
    },  # fmt: skip
    "final": {"enabled": False},
    "search": {"num_samples": 1, "concurrency": 1},
    "resources": {"cpu": 1, "gpu": 0},
    "space": {
        "groups": [
            {"name": "a", "units": "mid_block.attentions", "methods": {"frozen": {}, "full": {}}}
        ]
    },  # fmt: skip
}


def kind(proc: psutil.Process) -> str:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "?"
    if cmd.startswith("ray::"):  # a retitled worker or agent: its title says which
        return cmd.split()[0]
    for key in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env"):
        if key in cmd:
            return key
    return proc.name()


def start(spec: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "capsearch", "run", str(spec), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max", type=float, default=300.0)
    ap.add_argument("--next-at-once", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    spec = args.out / "micro.yaml"
    spec.write_text(yaml.safe_dump(MICRO))
    driver = start(spec, args.out / "run1")
    t0 = time.time()
    log = args.out / "run1" / "trials" / "t000" / "train_log.jsonl"
    while not (log.is_file() and log.stat().st_size > 0):
        if driver.poll() is not None or time.time() - t0 > 600:
            raise SystemExit("the first search ended or never trained")
        time.sleep(1)
    procs = psutil.Process(driver.pid).children(recursive=True)
    kinds = {p.pid: kind(p) for p in procs}
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    killed = time.time()
    second = start(spec, args.out / "run2") if args.next_at_once else None
    gone: dict[int, float] = {}
    while len(gone) < len(procs) and time.time() - killed < args.max:
        for p in procs:
            if p.pid not in gone:
                try:
                    alive = p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                except psutil.Error:
                    alive = False
                if not alive:
                    gone[p.pid] = round(time.time() - killed, 1)
        time.sleep(1)
    rows = [{"pid": pid, "kind": k, "gone_after_s": gone.get(pid)} for pid, k in kinds.items()]
    for row in rows:
        print(json.dumps(row))
    t1 = killed if second is not None else time.time()
    second = second or start(spec, args.out / "run2")
    code = second.wait()
    result = {
        "processes": rows,
        "still_alive_after_max": sum(1 for r in rows if r["gone_after_s"] is None),
        "max_s": args.max,
        "next_at_once": args.next_at_once,
        "next_search": {"exit": code, "seconds": round(time.time() - t1, 1)},
    }
    print(json.dumps(result["next_search"]))
    (args.out / "linger.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
