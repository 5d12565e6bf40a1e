"""Load and exhaustion, short (issue 8, part 3): ``tools/load.py`` as people run it.

One run of each scenario against real daemons: 1,000 connections held with
slowloris senders among them, a scan flood from another uid, and a short soak
at full scan load. Latencies and memory are measured by the tool and printed,
never asserted here: the assertions are about behaviour (``busy`` for
connection 1,001, slowloris cut, idle peers kept, the flooder ``rate_limited``,
its neighbour never refused, the soak without errors).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_load_short(tmp_path: Path) -> None:
    out_json = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "load.py"), "--soak", "6",
         "--flood-seconds", "3", "--slowloris-timeout", "2", "--json", str(out_json)],
        capture_output=True, text=True, timeout=180, cwd=str(ROOT),
    )
    report = proc.stdout[-5000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    last = proc.stdout.strip().splitlines()[-1]
    assert re.match(r"^load: health_p99_ms=\S+ busy_ok=1 slowloris_cut=20/20", last), report
    results = json.loads(out_json.read_text())

    c = results["connections"]
    assert c["accepted"] == c["connections"] == 1000, c
    assert c["health_samples"] > 10, c  # health kept answering with every slot taken
    assert c["busy"].startswith("busy"), c
    assert c["after_cut"] == "Pong", c  # the slowloris slots were freed
    assert c["idle_still_open"] == c["idle"], c

    f = results["flood"]
    if os.geteuid() == 0 and shutil.which("setpriv"):
        assert f["flood_rate_limited"] > 0, f
        assert f["flood_verdicts"] > 0, f  # limited, not starved
        assert f["polite_errors"] == {}, f
        assert f["polite_scans"] > 10, f
    else:
        assert "skipped" in f

    s = results["soak"]
    assert s["alive"] and s["errors"] == {} and s["scans"] > 50, s
