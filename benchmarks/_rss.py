"""Peak-RSS sampling for benchmark stages that run in their own subprocess.

`PEAK_RSS_SAMPLER` is Python source prepended to a stage's script: `_PeakRSS()` samples the resident set every
10 ms from the moment it is created (so the stage's imports, done before, are excluded), `stop()` returns the
peak in MiB, and `_report(seconds, sampler, **extra)` prints the stage's JSON line. The dataset and data-path
benchmarks and tests/test_bench.py share it, so they measure alike.
"""

PEAK_RSS_SAMPLER = """
import os, threading, time, json, sys
def _rss_mib():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
class _PeakRSS(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.base = self.peak = _rss_mib()
        self.running = True
    def run(self):
        while self.running:
            self.peak = max(self.peak, _rss_mib())
            time.sleep(0.01)
    def stop(self):
        self.running = False
        self.join()
        self.peak = max(self.peak, _rss_mib())
        return self.peak
def _report(seconds, sampler, **extra):
    print(json.dumps({"seconds": seconds, "base_rss_mib": sampler.base, "peak_rss_mib": sampler.stop(), **extra}))
"""
